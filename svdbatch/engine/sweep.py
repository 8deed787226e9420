"""Sweeps as one thing: the sweep root of a Hydra multirun, its points, reuse of identical
items across points, the comparison page and the sweep's status.

A sweep root (`hydra.sweep.dir`, by default outputs/<run.name>) holds Hydra's record of the
whole sweep (multirun.yaml) and one run dir per point, each with its own record of the
point's overrides (<point>/.hydra/overrides.yaml). Points are found through those records,
never by parsing folder names, so any sweep.subdir scheme works (nested folders too).

Reuse: an item's key (keys.KeyMaker: image bytes, resolved parameters, seed, model,
preprocessing) says everything that shapes its frames. When another point of the same
sweep (or a run named in run.reuse_from) already finished an item with the same key and
the same output settings, the output is hard-linked (copied across file systems) instead
of generated again, and the sidecar records where it came from (`reused_from`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdbatch.reports.sweep_root import (
    MULTIRUN_RECORD,
    is_sweep_root,
    point_dirs,
)
from svdbatch.rundir import records, reuse
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.sidecar_fields import SidecarImage, SidecarRow
from svdbatch.rundir.store import RunStore

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# Output settings that change the written file (not the frames): reuse needs them equal.


def current_sweep_root() -> Path | None:
    """The sweep root of the running Hydra multirun job, or None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return Path(HydraConfig.get().sweep.dir)
    except Exception:
        return None


# -- reuse across points ------------------------------------------------------------------
@dataclass(frozen=True)
class ReuseSource:
    run_dir: Path
    record: dict[str, Any]  # the results.jsonl record of the finished item

    @property
    def output(self) -> Path:
        return self.run_dir / self.record["output"]


class ReuseIndex:
    """Finished items of other run dirs, by (key, output key): the same frames written with
    the same output settings (format, fps, quality, loop) are the same file."""

    def __init__(self, run_dirs: Iterable[Path]):
        self.by_key: dict[tuple[str, str | None], ReuseSource] = {}
        self.sources: list[Path] = list(run_dirs)
        for run_dir in self.sources:
            for record in records.latest_results(run_dir).values():
                if not record.get("key") or "output" not in record:
                    continue
                found = (record["key"], record.get("output_key"))
                known = self.by_key.get(found)
                # Prefer the point that generated it over one that itself reused it.
                if known is None or (known.record.get("reused_from") and not record.get("reused_from")):
                    self.by_key[found] = ReuseSource(run_dir, record)

    def __len__(self) -> int:
        return len(self.by_key)

    def lookup(self, key: str | None, output_key: str | None) -> ReuseSource | None:
        source = self.by_key.get((key, output_key)) if key and output_key else None
        if source is None or not output_intact(source.run_dir, source.record):
            return None
        return source


def expand_run_dirs(paths: Iterable[Any]) -> list[Path]:
    """Run dirs named by run.reuse_from: a run dir, or a sweep root (all its points)."""
    found: list[Path] = []
    for ref in paths or []:
        path = Path(str(ref)).expanduser()
        if is_sweep_root(path):
            found += point_dirs(path)
        if records.has_records(path):
            found.append(path)
    return found


def reuse_index(own_dir: Path, sweep_root: Path | None, reuse_from: Iterable[Any]) -> ReuseIndex | None:
    """Other points of this sweep, then run.reuse_from; None when there is nothing to look in."""
    own = own_dir.resolve()
    candidates = (point_dirs(sweep_root) if sweep_root and sweep_root.is_dir() else []) + expand_run_dirs(reuse_from)
    unique, seen = [], {own}
    for run_dir in candidates:
        resolved = run_dir.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(run_dir)
    return ReuseIndex(unique) if unique else None


def commit_reused(store: Any, entry: Any, source: ReuseSource) -> bool:
    """Link one planned item's output from `source` and commit it (rundir/reuse.py),
    under the item's claim. False when it could not be (claimed elsewhere, source gone):
    the caller then generates it as usual."""

    claim = store.claim(entry.item.id)
    if claim is None:
        return False
    try:
        if store.done_record(entry.item.id, entry.key, entry.output_key) is not None:
            return True  # another process finished it since the plan
        source_store = RunStore(source.run_dir, store.format)
        row, image = SidecarRow(**entry.item.row_record()), SidecarImage(**entry.image_record(), size=None)
        reuse.commit_reused(store, entry.item.id, entry.key, source_store, source.record["id"], row, image)
        return True
    except Exception as exc:  # a vanished or unreadable source: generate instead
        log.warning("could not reuse %s from %s (%s); generating it", entry.item.id, source.run_dir, exc)
        return False
    finally:
        store.release(claim)


def check_reuse_from(paths: Iterable[Any]) -> list[str]:
    """run.reuse_from problems, found before anything runs."""
    problems = []
    for ref in paths or []:
        path = Path(str(ref)).expanduser()
        if not path.is_dir():
            problems.append(f"run.reuse_from: {ref} does not exist")
        elif not is_sweep_root(path) and not records.has_records(path):
            problems.append(
                f"run.reuse_from: {ref} is neither a run dir (records/ or results.jsonl) nor a sweep root ({MULTIRUN_RECORD})"
            )
    return problems
