"""Each writer's summary of its records (records/<writer>.summary.json) and a run dir's
totals: what `svdbatch status` reads instead of the records themselves.

A writer rewrites its summary (temporary + rename) every record_writer.SUMMARY_EVERY commits
or SUMMARY_EVERY_S seconds and when it closes. The summary states how many bytes of its
results file it covers: a reader that finds the file longer (a killed writer, or one that
has not flushed yet) folds in the records past that offset, and one that finds no summary
rebuilds it from the whole file. `svdbatch status` of a million-item run reads summaries
and a few tails, never the million lines (bench/status_scale.py).

A results line counts towards `done` unless it is a redo of an item that was done already
(`"redo": true`), a meta_* update of a done item (`meta_updated_at`) or a removal
(`"removed": true`, written by `verify --repair`, which counts -1).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import temp_prefix
from svdbatch.core.jsonl import latest_by_id, parse_jsonl
from svdbatch.rundir.records import (
    FAILURES_SUFFIX,
    LEGACY_FAILURES,
    LEGACY_RESULTS,
    RESULTS_SUFFIX,
    SUMMARY_SUFFIX,
    read_complete,
    records_dir,
    writer_names,
)

LEGACY_NAME = "legacy"  # records/legacy.summary.json: the summary of an old results.jsonl
SUMMARY_VERSION = 2  # 2: quality (duds, signal sums); an older summary is rebuilt from its records
RECENT = 64  # finishes a summary keeps: the throughput window (progress.THROUGHPUT_WINDOW, 50) and some


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
        data = read_complete(results, summary.results_bytes)
        for record in parse_jsonl(data, results):
            summary.add(record)
        summary.results_bytes += len(data)
    if failures is not None:
        try:
            fsize = failures.stat().st_size
        except FileNotFoundError:
            fsize = 0
        if fsize > summary.failures_bytes:
            data = read_complete(failures, summary.failures_bytes)
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
    data = read_complete(results)
    latest = latest_by_id(parse_jsonl(data, results))
    for record in sorted(latest.values(), key=lambda r: str(r.get("finished_at") or "")):
        summary.add({**record, "meta_updated_at": None})
    summary.done = sum(1 for r in latest.values() if not r.get("removed"))
    summary.results_bytes = len(data)
    fdata = read_complete(root / LEGACY_FAILURES)
    summary.failures, summary.failures_bytes = len(parse_jsonl(fdata)), len(fdata)
    return summary


def write_summary(path: Path, summary: Summary) -> None:
    """Replace a summary file whole (temporary + rename): a reader never sees half of one."""
    path.parent.mkdir(exist_ok=True)  # records/, never the run dir: a vanished one stays gone
    tmp = path.with_name(f"{temp_prefix(path.stem)}{threading.get_ident()}.tmp")
    tmp.write_bytes(summary.as_json())
    os.replace(tmp, path)


def save_legacy_summary(root: Path) -> None:
    """Called by a run that opens an old run dir (RunStore.prepare), so status need not
    parse the old results.jsonl each time."""
    root = Path(root)
    if not (root / LEGACY_RESULTS).is_file():
        return
    summary = legacy_summary(root)
    if summary is not None:
        write_summary(records_dir(root) / f"{LEGACY_NAME}{SUMMARY_SUFFIX}", summary)


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
