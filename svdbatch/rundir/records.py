"""The one reader and writer of a run dir's results and failure records.

Each process that writes records appends to files of its own::

    records/<start ms>-<host>-<pid>.results.jsonl    one line per committed item (store.commit)
    records/<start ms>-<host>-<pid>.failures.jsonl   one line per failed item or invalid row
    records/<start ms>-<host>-<pid>.summary.json     counts and recent finishes (see Summary)

No two processes ever append to one file, so nothing depends on O_APPEND or flock working
across the clients of a shared file system (NFS appends from two clients can interleave or
lose bytes). Readers merge every writer's file, oldest writer first, after the `results.jsonl`
and `failures.jsonl` of run dirs written before (read as they are, never rewritten).

A writer rewrites its summary (temporary + rename) every SUMMARY_EVERY commits or
SUMMARY_EVERY_S seconds and when it closes. The summary states how many bytes of its
results file it covers: a reader that finds the file longer (a killed writer, or one that
has not flushed yet) folds in the records past that offset, and one that finds no summary
rebuilds it from the whole file. `svdbatch status` of a million-item run reads summaries
and a few tails, never the million lines (bench/status_scale.py).

A results line counts towards `done` unless it is a redo of an item that was done already
(`"redo": true`), a meta_* update of a done item (`meta_updated_at`) or a removal
(`"removed": true`, written by `verify --repair`, which counts -1).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import HOST, temp_prefix
from svdbatch.core.jsonl import latest_by_id, parse_jsonl, read_jsonl_slices, to_json

log = logging.getLogger(__name__)

RECORDS_DIR = "records"
LEGACY_RESULTS = "results.jsonl"  # run dirs of older versions: one file every process appended to
LEGACY_FAILURES = "failures.jsonl"
RESULTS_SUFFIX = ".results.jsonl"
FAILURES_SUFFIX = ".failures.jsonl"
SUMMARY_SUFFIX = ".summary.json"
ORDER_FIELD = "recorded_ns"  # every record written since per-writer files: when (time.time_ns())
LEGACY_NAME = "legacy"  # records/legacy.summary.json: the summary of an old results.jsonl
SUMMARY_VERSION = 2  # 2: quality (duds, signal sums); an older summary is rebuilt from its records
SUMMARY_EVERY = 64  # commits between summary rewrites
SUMMARY_EVERY_S = 5.0  # or seconds
RECENT = 64  # finishes a summary keeps: the throughput window (progress.THROUGHPUT_WINDOW, 50) and some


# -- reading ----------------------------------------------------------------------------
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


def _read(path: Path, offset: int = 0) -> bytes:
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
    """When a record was written (Writer: time.time_ns()); 0 for an old run dir's lines,
    which come before any writer's."""
    value = record.get(ORDER_FIELD)
    return value if isinstance(value, int) else 0


def _read_all(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every record of these files in the order they were written: by their time stamps
    across files (a long-lived process's file may start before another's and end after it),
    in file order where equal (a stable sort)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        data = _read(path)
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


# -- summaries ----------------------------------------------------------------------------
@dataclass
class Summary:
    """What status needs of one writer's results, kept up to date by the writer."""

    version: int = SUMMARY_VERSION
    results_bytes: int = 0  # how much of the writer's results file this covers
    done: int = 0  # items this writer made done (not redos, updates; removals subtract)
    commits: int = 0  # results lines
    redone: int = 0
    updated: int = 0
    removed: int = 0
    reused: int = 0
    output_bytes: int = 0
    first_finished_at: str | None = None
    last_finished_at: str | None = None
    last_id: str | None = None
    failures: int = 0  # failure lines (covered: failures_bytes)
    failures_bytes: int = 0
    # [finished_at, seconds, reused] of the latest finishes (not updates, not removals)
    recent: list[list[Any]] = field(default_factory=list)
    # Quality (docs/quality.md) of the items this writer finished: how many carry signals,
    # how many are duds, and per signal [n, sum, sum of squares, min, max]. A redo adds its
    # new record without taking out the old one's: exact for a run whose items are done
    # once, which is every sweep point's case (bench/status_scale.py).
    judged: int = 0
    duds: int = 0
    signals: dict[str, list[float]] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        self.commits += 1
        if record.get("removed"):
            self.removed += 1
            self.done -= 1
            return
        if record.get("meta_updated_at"):
            self.updated += 1
            return
        if record.get("redo"):
            self.redone += 1
        else:
            self.done += 1
        reused = bool(record.get("reused_from"))
        self.reused += reused
        self.add_quality(record)
        self.output_bytes += int(record.get("output_bytes") or 0)
        finished = record.get("finished_at")
        if isinstance(finished, str):
            self.first_finished_at = self.first_finished_at or finished
            self.last_finished_at = finished
            self.last_id = str(record.get("id"))
            self.recent.append([finished, float(record.get("seconds") or 0.0), reused])
            if len(self.recent) > 2 * RECENT:
                del self.recent[:-RECENT]

    def add_quality(self, record: dict[str, Any]) -> None:
        signals = record.get("signals")
        if not isinstance(signals, dict):
            return
        self.judged += 1
        self.duds += record.get("dud") is True
        for name, value in signals.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                add_value(self.signals, name, float(value))

    def add_failure(self, record: dict[str, Any]) -> None:
        self.failures += 1

    def as_json(self) -> bytes:
        data = asdict(self)
        data["recent"] = self.recent[-RECENT:]
        return json.dumps(data, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Summary | None:
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("version") != SUMMARY_VERSION:
                return None
            return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return None


def add_value(sums: dict[str, list[float]], name: str, value: float) -> None:
    """Fold one value into [n, sum, sum of squares, min, max]."""
    stats = sums.get(name)
    if stats is None:
        sums[name] = [1, value, value * value, value, value]
        return
    stats[0] += 1
    stats[1] += value
    stats[2] += value * value
    stats[3] = min(stats[3], value)
    stats[4] = max(stats[4], value)


def merge_sums(into: dict[str, list[float]], other: dict[str, list[float]]) -> None:
    for name, (n, total, squares, low, high) in other.items():
        stats = into.get(name)
        if stats is None:
            into[name] = [n, total, squares, low, high]
        else:
            into[name] = [stats[0] + n, stats[1] + total, stats[2] + squares, min(stats[3], low), max(stats[4], high)]


def _load_summary(path: Path) -> Summary | None:
    try:
        return Summary.from_json(path.read_bytes())
    except OSError:
        return None


def _fold(summary: Summary, results: Path, failures: Path | None) -> Summary:
    """Bring a summary up to date with the records past the offsets it covers."""
    try:
        size = results.stat().st_size
    except FileNotFoundError:
        size = 0
    if size < summary.results_bytes or (failures is not None and _size(failures) < summary.failures_bytes):
        summary = Summary()  # the file was cut or replaced (by hand): rebuilt from what it holds
    if size > summary.results_bytes:
        data = _read(results, summary.results_bytes)
        for record in parse_jsonl(data, results):
            summary.add(record)
        summary.results_bytes += len(data)
    if failures is not None:
        try:
            fsize = failures.stat().st_size
        except FileNotFoundError:
            fsize = 0
        if fsize > summary.failures_bytes:
            data = _read(failures, summary.failures_bytes)
            summary.failures += len(parse_jsonl(data, failures))
            summary.failures_bytes += len(data)
    return summary


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def legacy_summary(root: Path) -> Summary | None:
    """The summary of an old run dir's results.jsonl: saved by the first run that resumes
    it (records/legacy.summary.json), folded forward if the file grew (an older svdbatch
    still appending), rebuilt in memory if missing. Done counts distinct ids there."""
    root = Path(root)
    results = root / LEGACY_RESULTS
    if not results.is_file() and not (root / LEGACY_FAILURES).is_file():
        return None
    saved = _load_summary(records_dir(root) / f"{LEGACY_NAME}{SUMMARY_SUFFIX}")
    if saved is not None:
        return _fold(saved, results, root / LEGACY_FAILURES)
    summary = Summary()
    data = _read(results)
    latest = latest_by_id(parse_jsonl(data, results))
    for record in sorted(latest.values(), key=lambda r: str(r.get("finished_at") or "")):
        summary.add({**record, "meta_updated_at": None})
    summary.done = sum(1 for r in latest.values() if not r.get("removed"))
    summary.results_bytes = len(data)
    fdata = _read(root / LEGACY_FAILURES)
    summary.failures, summary.failures_bytes = len(parse_jsonl(fdata)), len(fdata)
    return summary


def save_legacy_summary(root: Path) -> None:
    """Called by a run that opens an old run dir (RunStore.prepare), so status need not
    parse the old results.jsonl each time."""
    root = Path(root)
    if not (root / LEGACY_RESULTS).is_file():
        return
    summary = legacy_summary(root)
    if summary is not None:
        _write_atomic(records_dir(root) / f"{LEGACY_NAME}{SUMMARY_SUFFIX}", summary.as_json())


def summaries(root: Path) -> Iterator[tuple[str, Summary]]:
    """(writer, summary) for the legacy logs and every writer, each brought up to date."""
    root = Path(root)
    legacy = legacy_summary(root)
    if legacy is not None:
        yield LEGACY_NAME, legacy
    folder = records_dir(root)
    for name in writer_names(root):
        saved = _load_summary(folder / f"{name}{SUMMARY_SUFFIX}") or Summary()
        yield name, _fold(saved, folder / f"{name}{RESULTS_SUFFIX}", folder / f"{name}{FAILURES_SUFFIX}")


@dataclass
class RunTotals:
    """The summaries of a run dir, summed."""

    done: int = 0
    commits: int = 0
    reused: int = 0
    output_bytes: int = 0
    failures: int = 0
    last_finished_at: str | None = None
    last_id: str | None = None
    recent: list[dict[str, Any]] = field(default_factory=list)  # records throughput() reads
    writers: int = 0
    judged: int = 0
    duds: int = 0
    signals: dict[str, list[float]] = field(default_factory=dict)


def totals(root: Path) -> RunTotals:
    total = RunTotals()
    for _, summary in summaries(root):
        total.writers += 1
        total.done += summary.done
        total.commits += summary.commits
        total.reused += summary.reused
        total.output_bytes += summary.output_bytes
        total.failures += summary.failures
        total.judged += summary.judged
        total.duds += summary.duds
        merge_sums(total.signals, summary.signals)
        if summary.last_finished_at and (total.last_finished_at or "") <= summary.last_finished_at:
            total.last_finished_at, total.last_id = summary.last_finished_at, summary.last_id
        total.recent += [
            {"finished_at": at, "seconds": seconds, **({"reused_from": True} if reused else {})}
            for at, seconds, reused in summary.recent[-RECENT:]
        ]
    total.recent.sort(key=lambda r: str(r["finished_at"]))
    del total.recent[:-RECENT]  # the latest finishes of all writers are among each one's latest
    return total


# -- writing -----------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(exist_ok=True)  # records/, never the run dir: a vanished one stays gone
    tmp = path.with_name(f"{temp_prefix(path.stem)}{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _start_ms() -> int:
    return int(time.time() * 1000)


class Writer:
    """This process's record files in one run dir (RecordWriter.of gives the one per
    process and run dir). Thread-safe: the worker's writer thread and the driver share it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.name = f"{_start_ms():013d}-{HOST}-{os.getpid()}"
        folder = records_dir(self.root)
        self.results_path = folder / f"{self.name}{RESULTS_SUFFIX}"
        self.failures_path = folder / f"{self.name}{FAILURES_SUFFIX}"
        self.summary_path = folder / f"{self.name}{SUMMARY_SUFFIX}"
        self.summary = Summary()
        self._lock = threading.Lock()
        self._dirty = 0
        self._flushed_at = time.monotonic()

    def _append(self, path: Path, *records: dict[str, Any]) -> int:
        stamp = time.time_ns()  # readers order records of different writers by it (_read_all)
        text = "".join(to_json({**record, ORDER_FIELD: stamp}, sort_keys=True, default=str) + "\n" for record in records)
        line = text.encode()
        path.parent.mkdir(exist_ok=True)  # records/, never the run dir: a vanished one stays gone
        # Only this process writes this file: O_APPEND is a convenience, not a lock.
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn last line (a kill mid-write): never glue a record to it
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(line)

    def append_result(self, record: dict[str, Any]) -> None:
        with self._lock:
            size = self._append(self.results_path, record)
            self.summary.add(record)
            self.summary.results_bytes += size
            self._dirty += 1
            self._maybe_flush()

    def append_failure(self, record: dict[str, Any]) -> None:
        self.append_failures([record])

    def append_failures(self, failures: list[dict[str, Any]]) -> None:
        """Several failure records in one write and one fsync (a big manifest's invalid rows)."""
        if not failures:
            return
        with self._lock:
            size = self._append(self.failures_path, *failures)
            for record in failures:
                self.summary.add_failure(record)
            self.summary.failures_bytes += size
            self._dirty += len(failures)
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._dirty >= SUMMARY_EVERY or time.monotonic() - self._flushed_at >= SUMMARY_EVERY_S:
            self._flush()

    def _flush(self) -> None:
        try:
            _write_atomic(self.summary_path, self.summary.as_json())
        except OSError as exc:  # the summary is a cache: readers fold the records in themselves
            log.debug("could not write %s: %s", self.summary_path, exc)
            return
        self._dirty = 0
        self._flushed_at = time.monotonic()

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._flush()


_writers: dict[tuple[str, int], Writer] = {}
_writers_lock = threading.Lock()


def writer(root: Path) -> Writer:
    """This process's writer for a run dir (a forked child gets its own: the pid differs)."""
    key = (os.path.realpath(root), os.getpid())
    with _writers_lock:
        found = _writers.get(key)
        if found is None:
            if not _writers:
                atexit.register(flush_all)  # at the first writer, not on import: a caller's process is its own
            found = _writers[key] = Writer(Path(root))
        return found


def flush_all() -> None:
    """Write every summary of this process that is behind (at exit, and when a run ends)."""
    with _writers_lock:
        mine = [w for (_, pid), w in _writers.items() if pid == os.getpid()]
    for each in mine:
        each.flush()
