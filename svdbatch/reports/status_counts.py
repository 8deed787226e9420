"""Every manifest row of a run in exactly one class (done, in progress, failed, invalid,
pending): from the sets of a small run, or from the writers' counts of a big one."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svdbatch.rundir.claims import held_claims
from svdbatch.rundir.layout import layout_version, sidecar_relpath
from svdbatch.rundir.store import CLAIMS_DIR, is_invalid_record


def claimed_ids(run_dir: Path, skip: set[str] | None = None) -> set[str]:
    """Ids with a live claim (claims.held_claims: released claims are deleted, so claims/
    holds only the few being generated); ids in `skip` (done) are left out."""
    held = set(held_claims(run_dir / CLAIMS_DIR))
    return held - skip if skip else held


@dataclass
class Counts:
    done: set[str] = field(default_factory=set)
    in_progress: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    invalid: list[str] = field(default_factory=list)  # ids, or 'line N' for rows without one
    pending: set[str] | None = None  # None: the manifest is not known
    extra_done: set[str] = field(default_factory=set)  # done, but not a valid row of the manifest now
    # Counted, not listed (a big run, classify_counted): these override the sets' sizes.
    done_count: int | None = None
    pending_count: int | None = None
    extra_done_count: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        done = len(self.done) if self.done_count is None else self.done_count
        pending = self.pending_count if self.pending_count is not None else None if self.pending is None else len(self.pending)
        total = None if pending is None else done + len(self.in_progress) + len(self.failed) + len(self.invalid) + pending
        return {
            "done": done,
            "in_progress": len(self.in_progress),
            "failed": len(self.failed),
            "invalid": len(self.invalid),
            "pending": pending,
            "total": total,
            "done_not_in_manifest": len(self.extra_done) if self.extra_done_count is None else self.extra_done_count,
        }


def classify(
    manifest_ids: list[str] | None,
    bad_rows: list[tuple[int, str | None, list[str]]],
    done: set[str],
    failures: dict[str, dict[str, Any]],
    claimed: set[str],
    idless_failures: Iterable[dict[str, Any]] = (),
) -> Counts:
    """Put every manifest row in exactly one class: done, in progress, failed, invalid or
    pending. Without a manifest (`manifest_ids` None) only the logs can be counted."""
    counts = Counts()
    if manifest_ids is None:
        ids = set(done) | set(failures) | set(claimed)
        # Rows rejected before they had an id are only in the log: one per manifest line.
        counts.invalid += sorted({f"line {r.get('line')}" for r in idless_failures})
    else:
        ids = set(manifest_ids)
        counts.extra_done = set(done) - ids
        counts.invalid += [item_id if item_id else f"line {line}" for line, item_id, _ in bad_rows]
        counts.pending = set()
    for item_id in ids:
        if item_id in done:
            counts.done.add(item_id)
        elif item_id in claimed:
            counts.in_progress.add(item_id)
        elif item_id in failures:
            if is_invalid_record(failures[item_id]):
                counts.invalid.append(item_id)  # e.g. an image that only a decode rejects
            else:
                counts.failed.add(item_id)
        elif counts.pending is not None:
            counts.pending.add(item_id)
    return counts


def classify_counted(
    run_dir: Path,
    manifest_ids: list[str] | None,
    bad_rows: list[tuple[int, str | None, list[str]]],
    done_count: int,
    failures: dict[str, dict[str, Any]],
    claimed: set[str],
    idless_failures: Iterable[dict[str, Any]] = (),
) -> Counts:
    """classify for a big run: done is the summaries' count, not a set; a failed or claimed
    item is not done while its sidecar is missing (one stat each: failures are few); the
    rest of the manifest's valid rows are pending."""
    counts = Counts(done_count=done_count)
    layout = layout_version(run_dir)
    ids = set(manifest_ids) if manifest_ids is not None and (failures or claimed) else None

    def listed(item_id: str) -> bool:
        return ids is None or item_id in ids

    root = os.fspath(run_dir)

    def done(item_id: str) -> bool:
        return os.path.lexists(f"{root}/{sidecar_relpath(item_id, layout)}")

    if manifest_ids is None:
        counts.invalid += sorted({f"line {r.get('line')}" for r in idless_failures})
    else:
        counts.invalid += [item_id if item_id else f"line {line}" for line, item_id, _ in bad_rows]
    counts.in_progress = {item_id for item_id in claimed if listed(item_id) and not done(item_id)}
    for item_id, record in failures.items():
        if item_id in counts.in_progress or not listed(item_id) or done(item_id):
            continue
        if is_invalid_record(record):
            counts.invalid.append(item_id)
        else:
            counts.failed.add(item_id)
    if manifest_ids is not None:
        invalid_ids = len(counts.invalid) - len(bad_rows)
        left = len(manifest_ids) - done_count - len(counts.in_progress) - len(counts.failed) - invalid_ids
        counts.pending_count = max(0, left)
        counts.extra_done_count = max(0, -left)
        counts.done_count = done_count - counts.extra_done_count
    return counts
