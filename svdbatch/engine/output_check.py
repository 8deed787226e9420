"""Checking a big resume's finished outputs once its first items run, not before.

A restart of a million finished items would stat every video and sidecar (two million
stats) and list every bucket folder for temporaries before its first item could start. For
a big run dir the driver plans with the keys alone (plan_run(check_outputs=False)) and
sweeps only the top folders (RunStore.prepare(buckets=False)); this thread does the rest
while the workers generate: the temporaries of the bucket folders, then each trusted
item's output and sidecar sizes. Items found missing or cut are handed back to the driver,
which plans and runs them in the same run, so a deleted or truncated output of a finished
item is still redone by the next run, as on a small run dir.

Removing temporaries while the run's own workers write is safe: only those of dead
processes (and old ones from elsewhere) are removed, as the pool does after a worker dies.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from svdbatch.inputs.items import Item
from svdbatch.rundir import records
from svdbatch.rundir.intact import resume_intact
from svdbatch.rundir.resume_index import ResumeRecord
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)

# A run dir whose results records are this big (~12k finished items) is checked in the
# background; a smaller one before the first item, as it always was.
BACKGROUND_FROM_BYTES = 8 << 20


def in_background(store: RunStore) -> bool:
    """Whether this run dir is big enough for its checks to move off the critical path."""
    try:
        return records.results_bytes(store.root) >= BACKGROUND_FROM_BYTES
    except OSError:  # no run dir (yet), or not a folder: prepare() says what is wrong
        return False


def broken_items(store: RunStore, items: list[Item], index: Mapping[str, Any]) -> list[Item]:
    """The items whose output or sidecar is missing or not the size its record says."""
    root, layout = os.fspath(store.root), store.layout
    broken = []
    for item in items:
        record = index.get(item.id)
        if type(record) is not ResumeRecord or not resume_intact(root, record, layout):
            broken.append(item)
    return broken


class OutputCheck:
    """The background checks of one run: start() once dispatch begins, result() waits."""

    def __init__(self, store: RunStore, items: list[Item], index: Mapping[str, Any] | None):
        self.store = store
        self._items = items
        self._index = index
        self._broken: list[Item] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="svdbatch-output-check", daemon=True)

    def start(self) -> OutputCheck:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.store.remove_stale_temporaries(only_buckets=True)
            if self._items and self._index is not None:
                self._broken = broken_items(self.store, self._items, self._index)
        except BaseException as exc:  # handed to result(): the driver decides
            self._error = exc
        finally:
            self._items, self._index = [], None  # the index is the biggest thing a restart holds

    def result(self) -> list[Item]:
        """The items to redo, once the checks are over (raises what the checks raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._broken
