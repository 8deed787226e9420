"""Who holds which batch: the bookkeeping both engines share (pool.Pool, ray_engine).

The engine moves batches and reports (queues to spawned processes, or Ray actor calls);
the ledger decides what each worker gets next and what happens when one dies: a batch is
handed out at most MAX_ATTEMPTS times, then recorded as failed and left for the next run
to resume. Items a dead worker had already committed are counted as done, not redone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from svdbatch.core.outcomes import DONE, FAILED, INTERRUPTED, STOPPED, Outcome
from svdbatch.engine.plan import PlannedItem
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)

# Batches held by each worker: the one generating and the one whose images are loading.
ASSIGNED_PER_WORKER = 2
# A batch whose worker died is tried once more on another worker.
MAX_ATTEMPTS = 2

OnDone = Callable[[list[Outcome]], None]
# How the engine names a worker: its number (pool.Pool) or its actor name (ray_engine).
WorkerId = TypeVar("WorkerId", bound=Hashable)


class Ledger(Generic[WorkerId]):
    def __init__(self, batches: list[list[PlannedItem]], store: RunStore, on_done: OnDone, per_worker: int = ASSIGNED_PER_WORKER):
        self.batches = batches
        self.store = store
        self.on_done = on_done
        self.per_worker = per_worker
        self.waiting: deque[int] = deque(range(len(batches)))
        self.attempts = [0] * len(batches)
        self.finished = 0
        # Live workers and the batches each holds, in the order they were handed out.
        self.held: dict[WorkerId, list[int]] = {}
        self.load_errors: list[str] = []
        # Set when a worker stopped the run (disk full): nothing new is handed out.
        self.stop_reason: str | None = None
        # A signal asked the run to stop (stops.py): nothing new is handed out either, and
        # what is left is reported as interrupted, for the next run.
        self.interrupted = False

    # -- state ------------------------------------------------------------------------
    @property
    def workers(self) -> list[WorkerId]:
        return list(self.held)

    @property
    def complete(self) -> bool:
        return self.finished >= len(self.batches)

    def keep_going(self) -> bool:
        """More reports to wait for: work is left and someone can do it (after a stop, only
        until the batches already out come back)."""
        if self.complete or not self.held:
            return False
        return not ((self.stop_reason or self.interrupted) and not any(self.held.values()))

    # -- events -----------------------------------------------------------------------
    def interrupt(self) -> None:
        self.interrupted = True

    def join(self, worker: WorkerId) -> None:
        self.held[worker] = []

    def hand_out(self, worker: WorkerId) -> list[int]:
        """Batch ids the worker gets now (it holds up to per_worker); the engine sends them."""
        given: list[int] = []
        held = self.held.get(worker)
        while held is not None and self.waiting and len(held) < self.per_worker and not (self.stop_reason or self.interrupted):
            batch_id = self.waiting.popleft()
            self.attempts[batch_id] += 1
            held.append(batch_id)
            given.append(batch_id)
        return given

    def done(self, worker: WorkerId, batch_id: int, outcomes: list[Outcome]) -> None:
        held = self.held.get(worker)
        if held is None or batch_id not in held:
            return  # a late report from a worker already given up on: its batch was settled
        held.remove(batch_id)
        self.finished += 1
        stopped = [o for o in outcomes if o.status == STOPPED]
        if stopped and not self.stop_reason:
            self.stop_reason = stopped[0].error
            log.error("worker %s stopped the run: %s", worker, self.stop_reason)
        self.on_done(outcomes)

    def load_failed(self, worker: WorkerId, error: str) -> None:
        """The worker never started: what it held was not an attempt, so it goes back as is."""
        log.error("worker %s could not start: %s", worker, error)
        self.load_errors.append(error)
        held = self.held.pop(worker, [])
        for batch_id in held:
            self.attempts[batch_id] -= 1
        self.waiting.extendleft(reversed(held))

    def died(self, worker: WorkerId, reason: str) -> None:
        held = self.held.pop(worker, None)
        if held is None:
            return  # already accounted for
        if self.interrupted:  # it exited (or was killed) as asked: settle() leaves its batches for the next run
            self.skip_committed(held)
            self.waiting.extendleft(reversed(held))
            return
        log.error("worker %s died (%s) holding batches %s", worker, reason, held)
        self.skip_committed(held)
        for batch_id in reversed(held):
            if self.attempts[batch_id] >= MAX_ATTEMPTS:
                self.give_up(batch_id, f"worker {worker} died ({reason}), {self.attempts[batch_id]} attempts")
            else:
                self.waiting.appendleft(batch_id)

    def settle(self) -> None:
        """At the end: what was never handed out is either interrupted (a signal), stopped
        (disk full) or failed (no live worker left), so every item of the plan gets exactly
        one outcome. After a signal, what workers still held was abandoned: items committed
        on disk count as done, the rest is left for the next run."""
        if self.interrupted:
            for worker in list(self.held):
                held = self.held.pop(worker)
                self.skip_committed(held)
                self.waiting.extendleft(reversed(held))
        while self.waiting:
            batch_id = self.waiting.popleft()
            if self.interrupted:
                self.finished += 1
                self.on_done([Outcome(e.item.id, INTERRUPTED, error="interrupted") for e in self.batches[batch_id]])
            elif self.stop_reason:
                self.finished += 1
                self.on_done([Outcome(e.item.id, STOPPED, error=self.stop_reason) for e in self.batches[batch_id]])
            else:
                self.give_up(batch_id, "no live worker left; left for the next run to resume")

    # -- helpers ----------------------------------------------------------------------
    def skip_committed(self, batch_ids: list[int]) -> None:
        """A worker can die after committing an item but before its report arrived: those
        items are done on disk, so they are counted, not redone."""
        index = self.store.finished_index()
        for batch_id in list(batch_ids):
            done = [e for e in self.batches[batch_id] if self.store.is_done(e.item.id, e.key, e.output_key, index)]
            if not done:
                continue
            self.batches[batch_id] = [e for e in self.batches[batch_id] if e not in done]
            self.on_done([Outcome(e.item.id, DONE) for e in done])
            if not self.batches[batch_id]:
                batch_ids.remove(batch_id)
                self.finished += 1

    def give_up(self, batch_id: int, error: str) -> None:
        outcomes = []
        for entry in self.batches[batch_id]:
            self.store.record_failure(entry.item.id, entry.key, error, {"line": entry.item.line})
            outcomes.append(Outcome(entry.item.id, FAILED, error=error))
        self.finished += 1
        self.on_done(outcomes)
