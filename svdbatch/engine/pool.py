"""Run batches on one worker (in this process) or one worker process per device: hand
them out, replace workers that die, settle what a stop leaves. The worker processes
themselves (starting, exiting, kept between sweep points): crews.py.

Why spawned processes with a queue per worker, and not accelerate's PartialState or a
shared queue: each process owns one device and loads the pipeline once, exactly like the
single-device path (same `Worker` object). The parent hands out batches one at a time as
workers report them done (pull-based, so a slow item never stalls the others), and
because it always knows which batches a worker holds, a worker that dies loses nothing:
its batches go back to the queue once, then are recorded as failed and left for resume.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import threading
from typing import Any

from svdbatch.core.errors import ModelLoadError
from svdbatch.core.outcomes import Outcome
from svdbatch.engine.crews import Crew, crew_for, forget, log_from_worker
from svdbatch.engine.dispatch import Ledger, OnDone
from svdbatch.engine.plan import PlannedItem
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.stops import StopRequest
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)

# After a stop, workers have reported everything they held: they only need to exit.
EXIT_WAIT_AFTER_STOP_S = 10
# A worker process that dies (a segfault, the OOM killer) is replaced, so that one bad item
# does not stop the batch; its batches are retried (dispatch.MAX_ATTEMPTS). Not after this
# many deaths in a row with no batch done in between: something is wrong with every item.
MAX_RESTARTS_IN_A_ROW = 3


class NoWorkersLeft(ModelLoadError):
    pass


def execute(
    batches: list[list[PlannedItem]],
    spec: WorkerSpec,
    devices: list[str],
    on_done: OnDone,
    stop: StopRequest | None = None,
    cluster: Any = None,
    keep: bool = False,
    crew: Crew | None = None,
) -> None:
    """Run every batch; `on_done(outcomes)` is called once per finished batch. With a Ray
    cluster (ray_engine.RayCluster, run.engine=ray) its actors run them instead. `crew`: the
    early crew started for this run (its first worker is loading already); without one, a
    single device runs in this process and several get a crew now.

    `keep`: leave the worker processes (and their loaded pipelines) running for the next
    call with the same model, memory and devices: the next point of a sequential sweep.

    After `stop` is requested, no new batch starts and the run returns once the batches in
    flight are committed; past the grace (`stop.abandon()`) they are abandoned: in this
    process by stops.Interrupted, in worker processes or actors by killing them."""
    stop = stop or StopRequest(0)
    if cluster is not None:
        cluster.execute(batches, spec, on_done, stop)
    elif crew is None and len(devices) == 1:
        lock = threading.Lock()

        def report(_: int, outcomes: list[Outcome]) -> None:
            with lock:
                on_done(outcomes)

        from svdbatch.engine.worker_process import build_worker  # torch is loaded here already

        with stop.nothing_in_flight():  # a signal while the model loads need not wait for it
            worker = build_worker(spec, devices[0])
        worker.run(enumerate(batches), report, stop=stop.is_requested, abandon=stop.abandon)
    else:
        Pool(batches, spec, crew or crew_for(spec, devices), on_done, stop, keep).run()


def resolve_here(devices: Any, workers: int) -> list[str]:
    """run.devices resolved in this process: only for a caller that has imported torch
    already (a single in-process worker), or a cluster's nodes."""
    from svdbatch.engine.worker_process import resolve_device_names

    return resolve_device_names(devices, workers)


class Pool:
    def __init__(
        self,
        batches: list[list[PlannedItem]],
        spec: WorkerSpec,
        crew: Crew,
        on_done: OnDone,
        stop: StopRequest | None = None,
        keep: bool = False,
    ):
        self.spec = spec
        self.crew = crew
        self.keep = keep
        self.ledger: Ledger[int] = Ledger(batches, RunStore(spec.run_dir, spec.output["format"]), on_done)
        # A signal asked the run to stop (stops.py): nothing new is handed out.
        self.stop = stop or StopRequest(0)
        self.deaths_in_a_row = 0

    def run(self) -> None:
        """Hand out batches as workers finish them until all are done, a signal stops the
        run, or no worker is left; then settle what the ledger holds."""
        ledger, crew = self.ledger, self.crew
        crew.begin(self.spec)
        for number in range(len(crew.procs)):
            ledger.join(number)
        clean = False
        try:
            self.hand_out(crew.inboxes)
            while ledger.keep_going():
                if self.stop_requested_now():
                    break
                self.step()
            clean = not ledger.interrupted
        finally:
            self.release_crew(clean)
        ledger.settle()  # after the workers are idle or gone: what they committed is on disk
        if ledger.load_errors and len(ledger.load_errors) == len(crew.procs):
            raise NoWorkersLeft("no worker could load the model:\n" + "\n".join(ledger.load_errors))

    def stop_requested_now(self) -> bool:
        """After a signal: hand out nothing more and let the workers finish what they hold;
        True once the grace is over (what is left is abandoned)."""
        ledger = self.ledger
        if self.stop.requested and not ledger.interrupted:
            ledger.interrupt()
            self.crew.stop.set()
            for number in ledger.workers:
                self.crew.inboxes[number].put(None)  # wakes a worker waiting for work
        return ledger.interrupted and self.stop.abandon()

    def step(self) -> None:
        """One turn: take a worker's report, replace workers that died, hand out more."""
        crew, ledger = self.crew, self.ledger
        with contextlib.suppress(queue.Empty):
            self.handle(crew.events.get(timeout=0.25))
        dead = [number for number in ledger.workers if not crew.procs[number].is_alive()]
        if dead:
            self.drain(crew.events)  # what they reported before dying counts
        for number in dead:
            ledger.died(number, f"exit code {crew.procs[number].exitcode}")
            self.replace(number)
        if dead:  # what they were writing (a video being encoded while the next item generated)
            ledger.store.remove_stale_temporaries()
        self.hand_out(crew.inboxes)

    def release_crew(self, clean: bool) -> None:
        """A clean end keeps the workers for the next point (keep); a signal or an error
        closes them, after the grace at once."""
        crew = self.crew
        if clean:
            crew.end_point(self.ledger.workers, self.keep)
        else:
            crew.close(0 if self.stop.abandon() else EXIT_WAIT_AFTER_STOP_S)
        if not (clean and self.keep):
            forget(crew)

    def replace(self, number: int) -> None:
        """Start a new worker in a dead one's place, while work is waiting and deaths are not
        piling up (MAX_RESTARTS_IN_A_ROW)."""
        ledger = self.ledger
        if ledger.interrupted or ledger.stop_reason or not ledger.waiting:
            return
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row > MAX_RESTARTS_IN_A_ROW:
            log.error("worker %d not restarted: %d workers died in a row without finishing a batch", number, self.deaths_in_a_row)
            return
        log.warning(
            "restarting worker %d (%d of at most %d deaths in a row)", number, self.deaths_in_a_row, MAX_RESTARTS_IN_A_ROW
        )
        assert self.crew.devices is not None  # a running pool's crew knows its devices
        self.crew.start(number, self.spec, self.crew.devices[number])
        ledger.join(number)

    def hand_out(self, inboxes: list) -> None:
        for number in self.ledger.workers:
            for batch_id in self.ledger.hand_out(number):
                inboxes[number].put((batch_id, self.ledger.batches[batch_id]))

    def handle(self, event: tuple) -> None:
        kind, number = event[0], event[1]
        if kind == "done":
            self.ledger.done(number, event[2], event[3])
            self.deaths_in_a_row = 0
        elif kind == "log":
            log_from_worker(event[2], number, len(self.crew.procs))
        elif kind == "load_failed":
            self.ledger.load_failed(number, event[2])

    def drain(self, events: mp.Queue) -> None:
        while True:
            try:
                self.handle(events.get(timeout=0.2))
            except queue.Empty:
                return
