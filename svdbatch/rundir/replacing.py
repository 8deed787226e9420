"""Redoing a finished item without losing it: its old output and sidecar are moved aside
(replaced/<stamp>/, RunStore.replaced_dir) just before the new ones go into place, and put
back if the redo fails before its commit (engine/commit.py)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from svdbatch.rundir.sidecar import Sidecar, named_output
from svdbatch.rundir.sidecar_fields import SidecarError
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)


def set_aside(store: RunStore, item_id: str, new_key: str, new_output_key: str | None, folder: Path) -> list[tuple[Path, Path]]:
    """Before an item's new output is written: move its finished output of another key
    (or other output settings), then that sidecar, to `folder` (same relative paths), so
    nothing generated is overwritten. A sidecar this version cannot read (damaged, or of
    another schema) is moved too, with the output it names. The caller holds the item's
    claim and has generated the new frames: a redo that fails keeps the old output in
    place, and one that fails after the move puts them back (restore). Returns the
    (source, target) pairs moved, empty if nothing was."""
    sidecar_file = store.sidecar_path(item_id)
    try:
        sidecar: Sidecar | None = Sidecar.read(sidecar_file)
    except FileNotFoundError:
        return []
    except (OSError, SidecarError):
        sidecar = None
    if sidecar is not None and (not sidecar.done or sidecar.done_with(new_key, new_output_key)):
        return []
    named = sidecar.output.path if sidecar is not None else named_output(sidecar_file)
    inside = named is not None and not os.path.isabs(named) and ".." not in Path(named).parts
    output = store.root / named if inside and named is not None else store.root
    moved: list[tuple[Path, Path]] = []
    if sidecar is not None and sidecar.done:
        store.mark_redo(item_id)  # its commit is a redo: done already (summaries.py counts)
    # The video first: if the run dies in between, the expensive part is already safe.
    for source in (output, sidecar_file):
        if source == store.root or not os.path.lexists(source):
            continue
        target = folder / store.relative(source)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except OSError as exc:  # e.g. videos/ linked to another file system
            log.warning("could not keep %s in %s (%s); it will be overwritten", source, folder, exc)
            return moved
        moved.append((source, target))
    return moved


def restore(moved: list[tuple[Path, Path]]) -> None:
    """Undo set_aside: a redo failed before its sidecar was in place, so the old output
    and sidecar go back and the item stays done with its old key. Sidecar first, then
    the output: os.replace puts the old video over whatever the redo left there."""
    for source, target in reversed(moved):
        try:
            if source.is_dir() and not source.is_symlink():
                shutil.rmtree(source)  # a frames folder the failed redo left
            os.replace(target, source)
        except OSError as exc:
            log.error("could not put %s back after a failed redo (%s); it is in %s", source, exc, target)
            continue
        for folder in list(target.parents)[:4]:  # <bucket>/, items/, <stamp>/, replaced/ if left empty
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: other items were replaced there
