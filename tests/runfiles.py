"""Where a test finds a run dir's records and per-item files, in either layout (rundir/layout.py,
rundir/records.py): tests ask these instead of spelling paths out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from svdbatch.core.jsonl import latest_by_id
from svdbatch.rundir import records
from svdbatch.rundir.layout import item_relpath, layout_version, sidecar_relpath


def results_of(run_dir: Path) -> list[dict[str, Any]]:
    """Every results record (all writers; an old run dir's results.jsonl)."""
    return records.read_results(Path(run_dir))


def latest_results_of(run_dir: Path) -> dict[str, dict[str, Any]]:
    return latest_by_id(results_of(run_dir))


def failures_of(run_dir: Path) -> list[dict[str, Any]]:
    return records.read_failures(Path(run_dir))


def sidecar_rel(run_dir: Path, item_id: str) -> str:
    return sidecar_relpath(item_id, layout_version(run_dir))


def sidecar_file(run_dir: Path, item_id: str) -> Path:
    return Path(run_dir) / sidecar_rel(run_dir, item_id)


def video_rel(run_dir: Path, item_id: str, suffix: str = ".mp4") -> str:
    """videos/<bucket>/<id><suffix> (suffix '' for a frames folder)."""
    return item_relpath("videos", f"{item_id}{suffix}", item_id, layout_version(run_dir))


def video_file(run_dir: Path, item_id: str, suffix: str = ".mp4") -> Path:
    return Path(run_dir) / video_rel(run_dir, item_id, suffix)
