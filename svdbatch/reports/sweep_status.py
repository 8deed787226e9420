"""`svdbatch status <sweep root>`: every point's status, totals, reasons across points, an ETA."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdbatch.reports import progress, status
from svdbatch.reports.status import eta_line, reason_lines
from svdbatch.reports.sweep_page import point_quality
from svdbatch.reports.sweep_root import Point, read_sweep_spec, sweep_points, unstarted_points
from svdbatch.rundir import records, summaries
from svdbatch.rundir.intact import output_intact

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# -- the sweep's status -------------------------------------------------------------------
def reused_count(run_dir: Path, totals: summaries.RunTotals | None = None) -> int:
    """Finished items of a point that were linked from elsewhere, not generated (in a big
    point: the summaries' count, summaries.py)."""
    totals = totals or summaries.totals(run_dir)
    if totals.commits >= status.FAST_FROM:
        return totals.reused
    return sum(1 for r in records.latest_results(run_dir).values() if r.get("reused_from") and output_intact(run_dir, r))


def merge_reasons(per_point: list[tuple[Point, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One entry per reason across all points: summed count, the points it occurs at, one example."""
    merged: dict[str, dict[str, Any]] = {}
    for point, reasons in per_point:
        for reason in reasons:
            entry = merged.setdefault(reason["reason"], {**reason, "count": 0, "points": []})
            entry["count"] += reason["count"]
            entry["points"].append(point.short_title)
    return sorted(merged.values(), key=lambda r: -r["count"])


def collect_sweep(root: Path, window: int | None = None, now: Any = None) -> dict[str, Any]:
    """`svdbatch status <sweep root>` as one JSON-friendly dict: status.collect for every
    point, totals, failure reasons across points, and an ETA for the whole sweep (points
    not started yet count with the rows of the points that have)."""
    from datetime import datetime, timezone

    now = now or datetime.now(timezone.utc)
    window = window or progress.THROUGHPUT_WINDOW
    spec = read_sweep_spec(root)
    points = sweep_points(root, spec)
    reports = []
    generated: list[dict[str, Any]] = []
    for point in points:
        point_totals = summaries.totals(point.run_dir)  # the writers' summaries, read once per point
        report = status.collect(point.run_dir, window, now, point_totals)
        report["label"] = point.label
        report["counts"]["reused"] = reused_count(point.run_dir, point_totals)
        report["quality"] = point_quality(point.run_dir, point_totals)
        reports.append(report)
        generated += [r for r in point_totals.recent if not r.get("reused_from")]
    generated.sort(key=lambda r: str(r.get("finished_at")))  # the latest finishes of every point
    names = ("done", "duds", "reused", "in_progress", "failed", "invalid", "pending", "total")
    totals: dict[str, int | None] = {}
    for name in names:
        values = [r["counts"][name] for r in reports]
        totals[name] = None if any(v is None for v in values) else sum(values)
    unstarted = unstarted_points(spec, points)
    rows = max((r["counts"]["total"] or 0 for r in reports), default=0) or None
    pending, in_progress = totals["pending"], totals["in_progress"]
    remaining = None if pending is None or in_progress is None else pending + in_progress
    if remaining is not None and unstarted:
        remaining = None if rows is None else remaining + rows * len(unstarted)
        if totals["total"] is not None and rows is not None:
            totals["total"] += rows * len(unstarted)
    rate = progress.throughput(generated, window)  # reused items take no time: not in the rate
    live = any(r["live"] for r in reports)
    return {
        "sweep_root": str(root),
        "swept": spec.swept,
        "points": reports,
        "unstarted_points": unstarted,
        "counts": totals,
        "reasons": merge_reasons([(p, r["reasons"]) for p, r in zip(points, reports, strict=False)]),
        "invalid_reasons": merge_reasons([(p, r["invalid_reasons"]) for p, r in zip(points, reports, strict=False)]),
        "throughput": asdict(rate),
        "live": live,
        "remaining": remaining,
        "eta_s": progress.eta_seconds(remaining, rate.items_per_hour, live),
    }


def format_sweep_report(report: dict[str, Any]) -> str:

    counts = report["counts"]
    lines = [
        f"sweep root   {report['sweep_root']}",
        f"swept        {', '.join(report['swept']) or '-'}; {len(report['points'])} points"
        + (f" + {len(report['unstarted_points'])} not started" if report["unstarted_points"] else ""),
    ]

    def short(values: dict[str, str], fallback: str) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items()) or fallback

    labels = [short(p["label"], Path(p["run_dir"]).name) for p in report["points"]]
    waiting = [short(values, "?") for values in report["unstarted_points"]]
    width = min(max([len(x) for x in labels + waiting] + [12]), 70) + 2
    lines.append(
        f"  {'point':<{width}}{'done':>8}{'duds':>8}{'reused':>8}{'running':>8}{'failed':>8}{'invalid':>8}{'pending':>8}{'total':>8}"
    )

    def cells(c: dict[str, Any]) -> str:
        return "".join(
            f"{'?' if c[k] is None else c[k]:>8}"
            for k in ("done", "duds", "reused", "in_progress", "failed", "invalid", "pending", "total")
        )

    def cut(label: str) -> str:
        return label if len(label) <= width - 2 else label[: width - 3] + "…"

    for label, point in zip(labels, report["points"], strict=False):
        lines.append(f"  {cut(label):<{width}}{cells(point['counts'])}")
    for label in waiting:
        lines.append(f"  {cut(label):<{width}}{'(not started)':>16}")
    lines.append(f"  {'total':<{width}}{cells(counts)}")
    rate = report["throughput"]
    if rate["items_per_hour"]:
        per_hour = rate["items_per_hour"]
        lines.append(
            f"throughput   {per_hour:.{0 if per_hour >= 100 else 1}f} items/h generated over the last {rate['items']}"
            f" (mean {rate['mean_item_s']:.2f} s/item)"
        )
    else:
        lines.append("throughput   -")
    lines.append(
        eta_line(report["remaining"], report["eta_s"], not report["live"], "no point is running: run the same sweep again")
    )

    def where(reason: dict[str, Any]) -> str:
        points = ", ".join(reason["points"][:3]) + (" ..." if len(reason["points"]) > 3 else "")
        return f"e.g. {reason['example_id']}; at {points}"

    lines += reason_lines(report, where)
    return "\n".join(lines)
