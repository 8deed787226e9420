"""How fast a run goes and whether it still runs: throughput over the latest session,
liveness (claims, owner files, heartbeats), the ETA."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Any

from svdbatch.rundir.owners import HEARTBEAT_S, owner_state, read_owners
from svdbatch.rundir.store import parse_time

THROUGHPUT_WINDOW = 50
# Finishes further apart than this (or 10 mean items) split a run into sessions: a resumed
# run must not count yesterday's items, or the rate looks tiny and the ETA huge.
SESSION_GAP_S = 600.0


@dataclass
class Throughput:
    items: int  # finished items the rate is measured over
    span_s: float
    items_per_hour: float | None
    mean_item_s: float | None  # one item's own time (load + generate + write), not wall clock
    last_finished_at: str | None


def throughput(records: Iterable[dict[str, Any]], window: int = THROUGHPUT_WINDOW) -> Throughput:
    """Items per hour by wall clock over the last `window` finishes of the latest session.

    Wall clock, not the items' own seconds: with several workers (or shards) items overlap.
    The span runs from the first item's start (its finish minus its seconds) to the last
    finish, so it is not zero for one item or for finishes within the same second."""
    # The log is appended as items finish, so the latest finishes are at its end: parsing the
    # times of a generous tail, not of a 100k-line log, gives the same window.
    records = list(records)[-throughput_lines(window) :]
    finished = sorted(
        (stamp, float(r.get("seconds") or 0.0))
        for r in records
        if not r.get("meta_updated_at") and (stamp := parse_time(r.get("finished_at"))) is not None  # an edit is no finish
    )
    if not finished:
        return Throughput(0, 0.0, None, None, None)
    tail = finished[-window:]
    gap = session_gap(fmean(s for _, s in tail))
    start = len(tail) - 1
    while start > 0 and (tail[start][0] - tail[start - 1][0]).total_seconds() <= gap:
        start -= 1
    tail = tail[start:]
    span = (tail[-1][0] - tail[0][0]).total_seconds() + tail[0][1]
    rate = len(tail) * 3600.0 / span if span > 0 else None
    return Throughput(len(tail), span, rate, fmean(s for _, s in tail), tail[-1][0].isoformat())


def by_finish(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results records in the order they finished (every writer's, merged), updates and
    removals left out."""
    finished = [r for r in results if isinstance(r.get("finished_at"), str) and not r.get("meta_updated_at")]
    return sorted(finished, key=lambda r: str(r["finished_at"]))


def throughput_lines(window: int = THROUGHPUT_WINDOW) -> int:
    """How many of the log's last lines throughput reads (a generous tail around the window)."""
    return max(40 * window, 2000)


def session_gap(mean_item_s: float) -> float:
    return max(SESSION_GAP_S, 10 * mean_item_s)


def liveness(run_dir: Path, in_progress: int, now: datetime) -> tuple[bool | None, list[dict[str, Any]]]:
    """Whether a process is running on the run dir: True when one holds an item's claim or
    its owner file names a process of this host that still exists, False when none does
    (a killed run leaves its owner file, but its pid is gone), None (unknown) when the only
    owners are on other hosts: their heartbeat's age is all there is to go on."""
    owners = []
    for owner in read_owners(run_dir):
        updated = datetime.fromtimestamp(owner["updated"], timezone.utc)
        owners.append(
            {
                "pid": owner.get("pid"),
                "host": owner.get("host"),
                "started_at": owner.get("started_at"),
                "state": owner_state(owner),
                "last_update_age_s": round(max(0.0, (now - updated).total_seconds()), 1),
            }
        )
    states = {owner["state"] for owner in owners}
    if in_progress > 0 or "running" in states:
        return True, owners
    return (None if "unknown" in states else False), owners


def heartbeat_is_fresh(owners: list[dict[str, Any]]) -> bool:
    """An owner on another host updated its file within a few heartbeats."""
    return any(o["state"] == "unknown" and o["last_update_age_s"] <= 3 * HEARTBEAT_S for o in owners)


def eta_seconds(remaining: int | None, rate: float | None, live: bool = True) -> float | None:
    """Seconds until the rest is done at the current rate; None when unknown, or when
    nothing is running (a stopped run has no ETA, only a rate from when it ran)."""
    if remaining is None:
        return None
    if remaining == 0:
        return 0.0
    return remaining * 3600.0 / rate if rate and live else None
