"""Committing an item another run dir already finished with the same key (run.reuse,
engine/sweep.py): its output is linked, not generated again, and its sidecar says where it
came from (`reused_from`)."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone

from svdbatch.rundir.outputs import link_output, output_bytes
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import ReusedFrom, SidecarImage, SidecarRow
from svdbatch.rundir.store import RunStore


def commit_reused(
    store: RunStore, item_id: str, key: str, source: RunStore, source_id: str, row: SidecarRow, image: SidecarImage
) -> Sidecar:
    """Commit an item another run dir already finished with the same key: its output is
    linked here (outputs.link_output), and its sidecar is the source's (same frames, same
    params, same model) with this item's own id, row and image (the size of the source's:
    the same key means the same image bytes), plus `reused_from`.
    The results line is appended as for any commit, so resume, status and the dataset
    files treat it as done. Call under the item's claim."""
    start = time.perf_counter()
    recorded = Sidecar.read(source.sidecar_path(source_id))
    if recorded.key != key or not recorded.done:
        raise ValueError(f"{source.sidecar_path(source_id)} no longer holds key {key}")
    target = store.video_path(item_id)
    how = link_output(source.root / recorded.output.path, target)
    took = time.perf_counter() - start
    sidecar = recorded.reused(
        item_id,
        output=replace(recorded.output, path=store.relative(target), bytes=output_bytes(target)),
        reused_from=ReusedFrom(run_dir=str(source.root.resolve()), id=source_id, how=how),
        reuse_s=took,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        row=row,
        image=replace(image, size=recorded.image.size),  # same key: same image bytes
    )
    store.commit(sidecar)
    return sidecar
