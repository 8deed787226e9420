"""`svdbatch status <run dir> [--json]`: how far a run is, read from its run dir alone.

    done         the latest results record's output and sidecar are still there (sizes match);
                 in a run of FAST_FROM or more results lines: the count the writers' summaries
                 keep (summaries.py), trusted without stats (`svdbatch verify` checks every file)
    in progress  a live process holds the item's claim (claims/<id>.claim, claims.py)
    failed       the latest failure record is a generation error, and not done
    duds         done items whose kept attempt broke a quality rule (docs/quality.md): in a big
                 run, the count the writers' summaries keep
    invalid      the manifest row does not validate (now, or when the run read it)
    pending      every other manifest row
    live         a process of the run still exists: an item's claim is held, or an owner
                 file (owners/<pid>@<host>.json) names a process of this host that is alive;
                 unknown when the only owners are on other hosts (then: heartbeat age)

Nothing is re-hashed and no model is loaded: two stats per finished item (output and sidecar)
in a small run, the writers' summaries plus the tails they do not cover yet in a big one
(a million items in under a second, bench/status_scale.py), and the manifest's
rows come from the summary the run saved (cache/manifest-*.json) while the manifest file is
unchanged, so a 100k-row run answers without parsing it. Keys are not recomputed either,
so an item whose parameters changed since it finished still counts as done here (the next
run redoes it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.errors import ManifestError
from svdbatch.core.jsonl import latest_by_id
from svdbatch.core.quality import SIGNALS
from svdbatch.inputs.items import Manifest
from svdbatch.inputs.manifest import read_manifest
from svdbatch.reports.progress import THROUGHPUT_WINDOW, by_finish, eta_seconds, heartbeat_is_fresh, liveness, throughput
from svdbatch.reports.reasons import Reason, group_reasons, normalise_problem
from svdbatch.reports.status_counts import Counts, claimed_ids, classify, classify_counted
from svdbatch.rundir import records, summaries
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.layout import layout_version
from svdbatch.rundir.run_dirs import config_files, run_cwd
from svdbatch.rundir.store import CACHE_DIR, parse_time

# From this many results lines on, done is counted from the writers' summaries (summaries.py)
# instead of two stats per item: a million stats alone take seconds on a shared file system.
FAST_FROM = 5_000


# -- the run dir ----------------------------------------------------------------------
def locate(ref: str, run_dir: Path) -> Path | None:
    """A path from the run's config: as given if absolute, else relative to the run's own
    cwd, then to ours. None if it is in none of those places."""
    path = Path(ref)
    if path.is_absolute():
        return path if path.exists() else None
    cwd = run_cwd(run_dir)
    for candidate in ([cwd / path] if cwd else []) + [path]:
        if candidate.exists():
            return candidate
    return None


def manifest_refs(run_dir: Path) -> list[str]:
    """The manifest(s) named by the run's config files (shards normally share one)."""
    refs = []
    for path in config_files(run_dir):
        try:
            ref = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("manifest")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if ref and str(ref) not in refs:
            refs.append(str(ref))
    return refs


@dataclass
class ManifestView:
    """What status needs from the manifest: valid ids in order, and the rows that fail."""

    paths: list[str]
    ids: list[str] = field(default_factory=list)
    bad_rows: list[tuple[int, str | None, list[str]]] = field(default_factory=list)  # line, id, problems
    error: str | None = None  # why the row set is unknown

    @property
    def known(self) -> bool:
        return self.error is None


SUMMARY_VERSION = 1


def summary_path(cache_dir: Path, manifest: Path) -> Path:
    digest = hashlib.sha256(os.path.realpath(manifest).encode()).hexdigest()[:16]
    return cache_dir / f"manifest-{digest}.json"


def save_manifest_summary(cache_dir: Path, manifest: Manifest) -> None:
    """What status needs from a manifest file (valid ids in order, invalid rows), saved by
    the run so that status need not parse a 100k-row manifest again. Tied to the file's
    size and mtime: an edited manifest is parsed afresh. Not for folders (their mtime does
    not change when an image deep inside is added)."""
    path = manifest.path
    if not path.is_file():
        return
    info = path.stat()
    summary = {
        "version": SUMMARY_VERSION,
        "manifest": os.path.realpath(path),
        "bytes": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ids": [item.id for item in manifest.items],
        "bad_rows": [[line, item_id, [str(p) for p in problems]] for line, item_id, problems in manifest.bad_rows],
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(summary_path(cache_dir, path), json.dumps(summary, ensure_ascii=False).encode())


def load_manifest_summary(run_dir: Path, manifest: Path) -> dict[str, Any] | None:
    """The run's summary of this manifest file, if the file is unchanged since; else None."""
    try:
        summary = json.loads(summary_path(run_dir / CACHE_DIR, manifest).read_bytes())
        info = manifest.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("version") != SUMMARY_VERSION:
        return None
    if (summary.get("manifest"), summary.get("bytes"), summary.get("mtime_ns")) != (
        os.path.realpath(manifest),
        info.st_size,
        info.st_mtime_ns,
    ):
        return None
    return summary


def read_manifest_view(run_dir: Path) -> ManifestView:
    refs = manifest_refs(run_dir)
    if not refs:
        return ManifestView([], error="no config.yaml names a manifest")
    view = ManifestView(refs)
    seen: set[str] = set()
    for ref in refs:
        path = locate(ref, run_dir)
        if path is None:
            return ManifestView(refs, error=f"manifest {ref} not found")
        summary = load_manifest_summary(run_dir, path)
        if summary is not None:  # the run's own reading of this very file: no parsing
            ids = summary["ids"]
            bad_rows = [(line, item_id, list(problems)) for line, item_id, problems in summary["bad_rows"]]
        else:
            try:
                # No image reading: status must be quick; the run checks images itself.
                manifest = read_manifest(path, strict=False, check_images=False)
            except ManifestError as exc:
                return ManifestView(refs, error=f"manifest {ref} unreadable: {exc.problems[0] if exc.problems else exc}")
            ids = [item.id for item in manifest.items]
            bad_rows = [(line, item_id, [str(p) for p in problems]) for line, item_id, problems in manifest.bad_rows]
        view.ids += [item_id for item_id in ids if item_id not in seen]
        seen.update(ids)
        view.bad_rows += bad_rows
    return view


# -- failure reasons --------------------------------------------------------------------
def failure_reasons(counts: Counts, failures: dict[str, dict[str, Any]]) -> list[Reason]:
    return group_reasons((item_id, failures[item_id].get("error", "")) for item_id in sorted(counts.failed))


def invalid_reasons(
    counts: Counts, failures: dict[str, dict[str, Any]], view: ManifestView, idless: list[dict[str, Any]]
) -> list[Reason]:
    """One entry per problem of each invalid row: from the manifest as it reads now, else
    (rows only the run's image decode rejected, or no manifest) from the run's log."""
    examples: list[tuple[str, str]] = []
    if view.known:
        examples += [(item_id or f"line {line}", p) for line, item_id, problems in view.bad_rows for p in problems]
    else:
        examples += [(f"line {r.get('line')}", p) for r in idless for p in r.get("problems") or [r.get("error")]]
    from_manifest = {item_id for _, item_id, _ in view.bad_rows if item_id}
    for item_id in counts.invalid:
        record = failures.get(item_id)
        if record is not None and item_id not in from_manifest:
            examples += [(item_id, p) for p in record.get("problems") or [record.get("error")]]
    return group_reasons(examples, normalise_problem)


# -- quality ----------------------------------------------------------------------------
def quality_summary(totals: summaries.RunTotals) -> dict[str, Any]:
    """Over the finished items' results records (the writers' summaries keep the sums): how
    many carry quality signals, how many are duds (and the rate), and each signal's mean,
    standard deviation (population), min and max. What the sweep page compares across points
    (docs/quality.md)."""
    judged = totals.judged
    signals: dict[str, dict[str, float]] = {}
    for name in SIGNALS:
        stats = totals.signals.get(name)
        if not stats or not stats[0]:
            continue
        n, total, squares, low, high = stats
        mean = total / n
        sd = max(squares / n - mean * mean, 0.0) ** 0.5
        signals[name] = {"mean": round(mean, 4), "sd": round(sd, 4), "min": low, "max": high}
    return {
        "items": judged,
        "duds": totals.duds,
        "dud_rate": round(totals.duds / judged, 4) if judged else None,
        "signals": signals,
    }


# -- the report -------------------------------------------------------------------------
def collect(
    run_dir: Path, window: int = THROUGHPUT_WINDOW, now: datetime | None = None, totals: summaries.RunTotals | None = None
) -> dict[str, Any]:
    """Everything `svdbatch status` prints, as one JSON-friendly dict (`totals`: the run
    dir's summaries.totals, if the caller has them already)."""
    now = now or datetime.now(timezone.utc)
    failures_log = records.read_failures(run_dir)
    failures = latest_by_id(failures_log)
    # Rows rejected before they had an id: one per manifest line, the latest record.
    idless = list({r.get("line"): r for r in failures_log if r.get("id") is None}.values())
    view = read_manifest_view(run_dir)
    ids = view.ids if view.known else None
    totals = totals or summaries.totals(run_dir)
    # Done items that broke a quality rule (kept and marked, docs/quality.md): part of done.
    if totals.commits >= FAST_FROM:  # a big run: the summaries' counts, no per-item stats
        counts = classify_counted(run_dir, ids, view.bad_rows, totals.done, failures, claimed_ids(run_dir), idless)
        recent = totals.recent
        duds = totals.duds
    else:
        results = records.read_results(run_dir)
        latest = latest_by_id(results)
        layout = layout_version(run_dir)
        done = {item_id for item_id, record in latest.items() if output_intact(run_dir, record, layout)}
        counts = classify(ids, view.bad_rows, done, failures, claimed_ids(run_dir, done), idless)
        recent = by_finish(results)
        duds = sum(1 for item_id in done if latest[item_id].get("dud") is True)
    rate = throughput(recent, window)
    summary = counts.as_dict()
    summary["duds"] = duds
    pending = summary["pending"]
    remaining = None if pending is None else pending + len(counts.in_progress)
    live, owners = liveness(run_dir, len(counts.in_progress), now)
    return {
        "run_dir": str(run_dir),
        "manifest": {"paths": view.paths, "known": view.known, "error": view.error},
        "counts": summary,
        "in_progress_ids": sorted(counts.in_progress)[:100],
        "reasons": [asdict(r) for r in failure_reasons(counts, failures)],
        "invalid_reasons": [asdict(r) for r in invalid_reasons(counts, failures, view, idless)],
        "throughput": asdict(rate),
        "live": live,  # true, false, or null: unknown (only processes on other hosts; see owners)
        "owners": owners,
        "eta_s": eta_seconds(remaining, rate.items_per_hour, live is True or (live is None and heartbeat_is_fresh(owners))),
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600:02d} h"


def format_report(report: dict[str, Any], now: datetime | None = None) -> str:
    counts, rate, manifest = report["counts"], report["throughput"], report["manifest"]
    total = counts["total"]
    lines = [f"run dir      {report['run_dir']}"]
    names = ", ".join(manifest["paths"]) or "-"
    lines.append(f"manifest     {names}" + (f" ({total} rows)" if manifest["known"] else ""))

    def row(label: str, value: int | None, note: str = "") -> str:
        share = f"{100 * value / total:5.1f}%" if total and value is not None else ""
        return f"  {label:<12}{'?' if value is None else value:>8}  {share}{note}".rstrip()

    lines.append(
        row(
            "done",
            counts["done"],
            f"  (+{counts['done_not_in_manifest']} not in the manifest now)" if counts["done_not_in_manifest"] else "",
        )
    )
    if counts.get("duds"):
        lines.append(row("duds", counts["duds"], "  of the done: broke a quality rule (svdbatch gallery --duds only)"))
    lines.append(row("in progress", counts["in_progress"]))
    lines.append(row("failed", counts["failed"]))
    lines.append(row("invalid", counts["invalid"]))
    lines.append(row("pending", counts["pending"], "" if manifest["known"] else f"  unknown ({manifest['error']})"))

    if rate["items_per_hour"]:
        last = parse_time(rate["last_finished_at"])
        ago = format_duration(((now or datetime.now(timezone.utc)) - last).total_seconds()) if last else "-"
        per_hour = rate["items_per_hour"]
        lines.append(
            f"throughput   {per_hour:.{0 if per_hour >= 100 else 1}f} items/h over the last {rate['items']} finished"
            f" (mean {rate['mean_item_s']:.2f} s/item); last finished {ago} ago"
        )
    else:
        lines.append("throughput   -")
    lines.append(f"live         {live_text(report)}")
    remaining = None if counts["pending"] is None else counts["pending"] + counts["in_progress"]
    lines.append(eta_line(remaining, report["eta_s"], report["live"] is False, "no run is active: run the same command again"))
    lines += reason_lines(report, lambda r: f"e.g. {r['example_id']}")
    return "\n".join(lines)


def eta_line(remaining: int | None, eta_s: float | None, stopped: bool, why_none: str) -> str:
    """The ETA line of a status report (a run's or a sweep's); `why_none` says why work is
    left with nothing running."""
    if remaining and stopped:
        return f"ETA          - ({remaining} to go, but {why_none} to go on)"
    return f"ETA          {format_duration(eta_s)}" + (f" ({remaining} to go)" if remaining else "")


def reason_lines(report: dict[str, Any], where: Callable[[dict[str, Any]], str], shown: int = 20) -> list[str]:
    """Failure and invalid-row reasons, most common first, `shown` of each; `where` says
    where a reason was seen (an example id, the points)."""
    lines = []
    for title, reasons in (("failure reasons", report["reasons"]), ("invalid rows", report["invalid_reasons"])):
        if reasons:
            lines.append(f"{title}:")
            lines += [f"  {r['count']:>6}  {r['reason']}  ({where(r)})" for r in reasons[:shown]]
            if len(reasons) > shown:
                lines.append(f"  ... {len(reasons) - shown} more (see --json)")
    return lines


def live_text(report: dict[str, Any]) -> str:
    owners = report.get("owners") or []
    running = [f"{o['pid']}@{o['host']}" for o in owners if o["state"] == "running"]
    if report["live"] is True:
        return "yes" + (f" (pid {', '.join(running)})" if running else " (an item is being generated)")
    if report["live"] is None:
        other = [o for o in owners if o["state"] == "unknown"]
        newest = min(o["last_update_age_s"] for o in other)
        hosts = ", ".join(sorted({str(o["host"]) for o in other}))
        return f"unknown (runs on {hosts}; last heartbeat {format_duration(newest)} ago)"
    dead = [f"{o['pid']}@{o['host']}" for o in owners if o["state"] == "dead"]
    return "no" + (f" (pid {', '.join(dead)} is gone: killed or crashed)" if dead else "")
