"""The one writer of a run dir's records: this process's results and failure files, appended
to by it alone (records.py says why), and its summary, rewritten as it goes (summaries.py)."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import HOST
from svdbatch.core.jsonl import to_json
from svdbatch.rundir.records import FAILURES_SUFFIX, ORDER_FIELD, RESULTS_SUFFIX, SUMMARY_SUFFIX, records_dir
from svdbatch.rundir.summaries import Summary, write_summary

log = logging.getLogger(__name__)

SUMMARY_EVERY = 64  # commits between summary rewrites
SUMMARY_EVERY_S = 5.0  # or seconds


def _start_ms() -> int:
    return int(time.time() * 1000)


class Writer:
    """This process's record files in one run dir (writer() gives the one per
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
        stamp = time.time_ns()  # readers order records of different writers by it (records._read_all)
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
            write_summary(self.summary_path, self.summary)
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
