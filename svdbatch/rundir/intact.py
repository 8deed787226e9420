"""Whether a finished item's files are still there as they were committed: its output and
sidecar, by their recorded sizes (two stats per item, cheap enough for every row of a
resume; `svdbatch verify`, verify.py, reads every byte)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from svdbatch.rundir.layout import layout_version, sidecar_relpath
from svdbatch.rundir.outputs import output_bytes
from svdbatch.rundir.resume_index import ResumeRecord


def output_intact(run_dir: str | os.PathLike, record: Mapping[str, Any] | ResumeRecord, layout: int | None = None) -> bool:
    """A results record's output and sidecar are still there, with the sizes they were
    committed with (two stats: users delete videos or sidecars, and this runs for every row
    of a resume; verify.py reads every byte). Lines written before sidecar sizes were
    recorded only need the sidecar to exist. `layout`: the run dir's (layout.py), if known."""
    root = os.fspath(run_dir)
    output = record.get("output")  # .get: a record's dict or a ResumeRecord
    if output is None or output_bytes(f"{root}/{output}") != record.get("output_bytes"):
        return False
    version = layout_version(root) if layout is None else layout
    sidecar_size = output_bytes(f"{root}/{sidecar_relpath(str(record.get('id')), version)}")
    recorded = record.get("sidecar_bytes")
    return sidecar_size == recorded if recorded is not None else sidecar_size >= 0


def resume_intact(root: str, record: ResumeRecord, layout: int) -> bool:
    """output_intact for a compact index's record (run for each of a million done rows)."""
    if record.output is None or output_bytes(f"{root}/{record.output}") != record.output_bytes:
        return False
    sidecar_size = output_bytes(f"{root}/{sidecar_relpath(record.id, layout)}")
    return sidecar_size == record.sidecar_bytes if record.sidecar_bytes is not None else sidecar_size >= 0
