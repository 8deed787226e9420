"""What a killed run leaves in a run dir, and its removal by the next one: temporaries whose
writer is dead (or old ones from elsewhere), owner files of dead runs, claims of dead holders.
A fresh one may belong to a live process (a second worker, or a shard on another node
sharing this dir), so it stays. RunStore.prepare and remove_stale_temporaries call these."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from svdbatch.core.atomic import HOST, TEMP_MARKER, written_by_dead_process
from svdbatch.rundir import claims as leases
from svdbatch.rundir.claims import CLAIM_SUFFIX
from svdbatch.rundir.owners import owner_state, read_owners

STALE_TEMP_SECONDS = 600.0  # another host's temporary or owner file untouched this long is a dead run's


def remove_stale_claims(claims_dir: Path) -> int:
    """Claims (and takeover locks) of dead holders (claims.py); in a run dir of an older
    version also its flock files, one per item ever claimed: empty, never held by this version."""
    removed = 0
    for folder, _, files in os.walk(claims_dir):
        for name in files:
            path = Path(folder, name)
            if name.endswith((CLAIM_SUFFIX, leases.TAKEOVER_SUFFIX)) and leases.is_stale(path):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def remove_dead_owners(root: Path, older_than_s: float = STALE_TEMP_SECONDS) -> None:
    """Owner files a killed run left: its pid is gone (this host), or no heartbeat for
    long (another host)."""
    cutoff = time.time() - older_than_s
    for owner in read_owners(root):
        here = owner.get("host") == HOST
        if (here and owner_state(owner) == "dead") or owner["updated"] < cutoff:
            Path(owner["file"]).unlink(missing_ok=True)


def remove_temporaries(folders: list[Path], cutoff: float) -> int:
    """Delete the temporaries in these folders whose writer (on this host) is dead, and those
    older than `cutoff` from elsewhere (not the subfolders: the caller names those it means)."""
    removed = 0
    for folder in folders:
        try:
            entries = os.scandir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            if TEMP_MARKER not in entry.name or not entry.name.startswith("."):
                continue
            try:
                if not written_by_dead_process(entry.name) and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue  # a live writer renamed it into place meanwhile (a run's workers go on while the pool cleans up)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def subfolders(folder: Path) -> list[os.DirEntry[str]]:
    """A folder's subfolders (the bucket folders of videos/, items/, gallery/, downloads/)."""
    try:
        return [entry for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")]
    except FileNotFoundError:
        return []
