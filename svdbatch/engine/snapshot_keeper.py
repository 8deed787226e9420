"""Keeping a run's resume snapshot (rundir/resume_index.py) up to date while it runs.

A run killed after a million commits would leave a snapshot of its start, and the restart
would decode every record written since (seconds per hundred thousand). So while a run
generates, this thread brings the snapshot up to date every REFRESH_S once the records
have grown by resume_index.SAVE_AFTER_BYTES: a load, a decode of what is new and a save,
a few seconds every few minutes at a million items, none on a small run dir.

The refresh runs in a short-lived child process (torch-free: it imports rundir/ only): the
index it loads (~0.45 GB at a million items) is never added to the driver's own memory,
which during a first run holds every planned item.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from svdbatch.rundir import records, resume_index
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)

REFRESH_S = 300.0
REFRESH_TIMEOUT_S = 600.0
# The folder that holds this svdbatch package: the child imports the same code.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
CHILD = "import sys; from svdbatch.rundir.resume_index import refresh; refresh(sys.argv[1], sys.argv[2])"


def refresh_in_child(store: RunStore) -> None:
    """resume_index.refresh in a child process; raises if it fails."""
    path = os.pathsep.join([PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    subprocess.run(
        [sys.executable, "-c", CHILD, os.fspath(store.root), os.fspath(store.cache)],
        env={**os.environ, "PYTHONPATH": path},
        check=True,
        timeout=REFRESH_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


class SnapshotKeeper:
    """start() when the workers start, stop() when they are done."""

    def __init__(self, store: RunStore, every_s: float | None = None):
        self.store = store
        self.every_s = REFRESH_S if every_s is None else every_s
        self._since = records.results_bytes(store.root)  # what the snapshot planning saved (or skipped) covers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="svdbatch-snapshot", daemon=True)

    def start(self) -> SnapshotKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.refresh()

    def refresh(self) -> bool:
        """Save the snapshot if the records grew enough since the last save; True if saved."""
        try:
            size = records.results_bytes(self.store.root)
            if size - self._since < resume_index.SAVE_AFTER_BYTES:
                return False
            refresh_in_child(self.store)
        except Exception as exc:  # a cache: the next restart decodes more, nothing else
            log.debug("could not refresh the resume snapshot: %s", exc)
            return False
        self._since = size
        return True
