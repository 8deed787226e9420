"""The one reader of a run dir's results and failure records, and their file names.

Each process that writes records appends to files of its own (record_writer.py)::

    records/<start ms>-<host>-<pid>.results.jsonl    one line per committed item (store.commit)
    records/<start ms>-<host>-<pid>.failures.jsonl   one line per failed item or invalid row
    records/<start ms>-<host>-<pid>.summary.json     counts and recent finishes (summaries.py)

No two processes ever append to one file, so nothing depends on O_APPEND or flock working
across the clients of a shared file system (NFS appends from two clients can interleave or
lose bytes). Readers merge every writer's file, oldest writer first, after the `results.jsonl`
and `failures.jsonl` of run dirs written before (read as they are, never rewritten).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from svdbatch.core.jsonl import latest_by_id, parse_jsonl, read_jsonl_slices

RECORDS_DIR = "records"
LEGACY_RESULTS = "results.jsonl"  # run dirs of older versions: one file every process appended to
LEGACY_FAILURES = "failures.jsonl"
RESULTS_SUFFIX = ".results.jsonl"
FAILURES_SUFFIX = ".failures.jsonl"
SUMMARY_SUFFIX = ".summary.json"
ORDER_FIELD = "recorded_ns"  # every record written since per-writer files: when (time.time_ns())


def records_dir(root: Path) -> Path:
    return Path(root) / RECORDS_DIR


def writer_names(root: Path) -> list[str]:
    """Every writer that left records, oldest first (names start with the start time)."""
    folder = records_dir(root)
    try:
        names = {
            entry.name[: -len(suffix)]
            for entry in os.scandir(folder)
            for suffix in (RESULTS_SUFFIX, FAILURES_SUFFIX)
            if entry.name.endswith(suffix) and not entry.name.startswith(".")
        }
    except FileNotFoundError:
        return []
    return sorted(names)


def _complete_lines(data: bytes) -> bytes:
    """The bytes up to the last newline: a writer killed mid-line leaves a torn tail that
    nobody will ever complete (its file is its own), so it is not a record."""
    return data[: data.rfind(b"\n") + 1]


def read_complete(path: Path, offset: int = 0) -> bytes:
    """The file's complete lines from `offset` on (none if it is missing)."""
    try:
        with open(path, "rb") as handle:
            if offset:
                handle.seek(offset)
            return _complete_lines(handle.read())
    except FileNotFoundError:
        return b""


def results_files(root: Path) -> list[Path]:
    root = Path(root)
    return [root / LEGACY_RESULTS] + [records_dir(root) / f"{name}{RESULTS_SUFFIX}" for name in writer_names(root)]


def results_bytes(root: Path) -> int:
    """How big the run dir's results records are (one stat per writer)."""
    total = 0
    for path in results_files(root):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def failures_files(root: Path) -> list[Path]:
    root = Path(root)
    return [root / LEGACY_FAILURES] + [records_dir(root) / f"{name}{FAILURES_SUFFIX}" for name in writer_names(root)]


def recorded_ns(record: dict[str, Any]) -> int:
    """When a record was written (record_writer.Writer: time.time_ns()); 0 for an old run dir's lines,
    which come before any writer's."""
    value = record.get(ORDER_FIELD)
    return value if isinstance(value, int) else 0


def _read_all(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every record of these files in the order they were written: by their time stamps
    across files (a long-lived process's file may start before another's and end after it),
    in file order where equal (a stable sort)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        data = read_complete(path)
        if data:
            records += parse_jsonl(data, path)
    records.sort(key=recorded_ns)
    return records


def results_slices(root: Path) -> Iterator[list[dict[str, Any]]]:
    """Every results record, file by file, about 4 MB of records at a time: a resume's
    compact index (RunStore.finished_index) never holds a million records whole. Not in
    time order across files: the reader keeps the record with the latest recorded_ns."""
    for path in results_files(root):
        yield from read_jsonl_slices(path)


def read_results(root: Path) -> list[dict[str, Any]]:
    """Every results record of the run dir, in the order they were written (_read_all)."""
    return _read_all(results_files(root))


def read_failures(root: Path) -> list[dict[str, Any]]:
    return _read_all(failures_files(root))


def latest_results(root: Path) -> dict[str, dict[str, Any]]:
    """The latest results record per item id (a removal record stays: it has no output,
    so output_intact says not done)."""
    return latest_by_id(read_results(root))


def latest_failures(root: Path) -> dict[str, dict[str, Any]]:
    return latest_by_id(read_failures(root))


def has_records(root: Path) -> bool:
    root = Path(root)
    return (root / LEGACY_RESULTS).is_file() or (root / LEGACY_FAILURES).is_file() or bool(writer_names(root))
