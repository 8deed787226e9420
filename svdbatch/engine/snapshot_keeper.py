"""Keeping a run's resume snapshot (rundir/resume_index.py) up to date while it runs.

A run killed after a million commits would leave a snapshot of its start, and the restart
would decode every record written since (seconds per hundred thousand). So while a run
generates, this thread brings the snapshot up to date every REFRESH_S once the records
have grown by resume_index.SAVE_AFTER_BYTES: a load, a decode of what is new and a save,
a few seconds every few minutes at a million items, none on a small run dir.
"""

from __future__ import annotations

import logging
import threading

from svdbatch.rundir import records, resume_index
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)

REFRESH_S = 300.0


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
            resume_index.refresh(self.store.root, self.store.cache)
        except Exception as exc:  # a cache: the next restart decodes more, nothing else
            log.debug("could not refresh the resume snapshot: %s", exc)
            return False
        self._since = size
        return True
