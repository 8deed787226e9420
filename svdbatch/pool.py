"""Run batches on one worker (in this process) or one worker process per device.

Why spawned processes with a queue per worker, and not accelerate's PartialState or a
shared queue: each process owns one device and loads the pipeline once, exactly like the
single-device path (same `Worker` object). The parent hands out batches one at a time as
workers report them done (pull-based, so a slow item never stalls the others), and
because it always knows which batches a worker holds, a worker that dies loses nothing:
its batches go back to the queue once, then are recorded as failed and left for resume.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from .config import MemoryConfig, ModelConfig, OutputConfig
from .dispatch import Ledger, OnDone
from .models import ModelLoadError, load_pipeline
from .worker import Outcome, Worker
from .plan import PlannedItem
from .stops import StopRequest, die_with_parent, ignore_stop_signals, stop_signals_blocked
from .store import RunStore

log = logging.getLogger(__name__)

# How long a worker may take to exit once it has nothing left to do, before it is killed.
EXIT_WAIT_S = 60
# After a stop, workers have reported everything they held: they only need to exit.
EXIT_WAIT_AFTER_STOP_S = 10


class NoWorkersLeft(ModelLoadError):
    pass


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain picklable data."""

    model: dict[str, Any]
    memory: dict[str, Any]
    output: dict[str, Any]
    run_dir: str
    num_threads: int
    step_progress: bool
    context: dict[str, Any]
    retry_on_oom: bool = False
    # run.keep_replaced: where a redone item's older output is moved before the new one is written.
    keep_replaced_in: Optional[str] = None

    def build(self, device: torch.device) -> Worker:
        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model)
        memory = OmegaConf.merge(OmegaConf.structured(MemoryConfig), self.memory)
        output = OmegaConf.merge(OmegaConf.structured(OutputConfig), self.output)
        store = RunStore(self.run_dir, output.format)
        loaded = load_pipeline(model, memory, device)
        worker = Worker(loaded, store, output, self.context, self.num_threads, self.step_progress, self.retry_on_oom)
        worker.keep_replaced_in = self.keep_replaced_in
        return worker


def execute(
    batches: list[list[PlannedItem]], spec: WorkerSpec, devices: list[torch.device], on_done: OnDone,
    stop: Optional[StopRequest] = None, cluster: Any = None, keep: bool = False,
) -> None:
    """Run every batch; `on_done(outcomes)` is called once per finished batch. With a Ray
    cluster (ray_engine.RayCluster, run.engine=ray) its actors run them instead.

    `keep`: leave the worker processes (and their loaded pipelines) running for the next
    call with the same model, memory and devices: the next point of a sequential sweep.

    After `stop` is requested, no new batch starts and the run returns once the batches in
    flight are committed; past the grace (`stop.abandon()`) they are abandoned: in this
    process by stops.Interrupted, in worker processes or actors by killing them."""
    stop = stop or StopRequest(0)
    if cluster is not None:
        cluster.execute(batches, spec, on_done, stop)
    elif len(devices) == 1:
        lock = threading.Lock()

        def report(_: int, outcomes: list[Outcome]) -> None:
            with lock:
                on_done(outcomes)

        with stop.nothing_in_flight():  # a signal while the model loads need not wait for it
            worker = spec.build(devices[0])
        worker.run(enumerate(batches), report, stop=stop.is_requested, abandon=stop.abandon)
    else:
        Pool(batches, spec, devices, on_done, stop, keep).run()


def worker_main(
    spec: Optional[WorkerSpec], device: str, number: int, inbox: mp.Queue, events: mp.Queue, stop: Any, driver_pid: int
) -> None:
    """Entry point of a worker process: one run (a sweep point) per spec. After a point's
    last batch (None) it reports idle and waits for the next point's spec (None: exit); the
    pipeline stays loaded in between (models.load_pipeline keeps it). `stop` (an Event) is
    set by the driver after a signal: no new batch starts."""
    ignore_stop_signals()
    die_with_parent(driver_pid)
    # tqdm (diffusers' step bars) would create a cross-process lock, registered with the
    # driver's resource tracker; a worker killed after a stop's grace would leave it
    # registered, and the tracker warns at exit. A worker needs no lock across processes.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    previous = None
    while spec is not None:
        try:
            worker = spec.build(torch.device(device))
        except BaseException as exc:
            events.put(("load_failed", number, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return
        if worker.loaded is not previous:  # a fresh load, not the pipeline of the last point
            events.put(("loaded", number, worker.loaded.identity.name, worker.loaded.load_seconds))
        previous = worker.loaded

        def batches():
            while not stop.is_set() and (task := inbox.get()) is not None:
                yield task

        worker.run(batches(), lambda batch_id, outcomes: events.put(("done", number, batch_id, outcomes)), stop=stop.is_set)
        events.put(("idle", number))
        if stop.is_set():
            return
        spec = inbox.get()


class Crew:
    """One worker process per device, kept between runs that share what the workers were
    built from (model, memory preset, thread count, devices): the sequential points of a
    sweep load the pipeline (and warm up a compiled UNet) once per device, not once per point."""

    def __init__(self, key: str, devices: list[torch.device]):
        self.key = key
        self.devices = devices
        self.context = mp.get_context("spawn")  # CUDA cannot be forked; spawn is also the CPU path
        self.events = self.context.Queue()
        self.stop = self.context.Event()  # set after a signal: workers start no new batch
        self.inboxes: list[Any] = [None] * len(devices)
        self.procs: list[Any] = [None] * len(devices)
        self.idle: list[bool] = [False] * len(devices)

    def begin(self, spec: WorkerSpec) -> None:
        """Hand the point's spec to every worker: idle live ones get it by message, missing
        or dead ones are (re)started with it."""
        for number, device in enumerate(self.devices):
            proc = self.procs[number]
            if proc is not None and proc.is_alive() and self.idle[number]:
                self.inboxes[number].put(spec)
            else:
                if proc is not None and proc.is_alive():
                    proc.kill()
                self.inboxes[number] = self.context.Queue()
                self.procs[number] = self.context.Process(
                    target=worker_main,
                    args=(spec, str(device), number, self.inboxes[number], self.events, self.stop, os.getpid()),
                    name=f"svdbatch-worker-{number}",
                    daemon=True,
                )
                with stop_signals_blocked():  # a Ctrl-C cannot kill it while it imports
                    self.procs[number].start()
            self.idle[number] = False

    def end_point(self, alive: list[int], keep: bool) -> None:
        """After a run: tell the live workers the point is over and wait until each has
        committed what it holds (idle); without `keep`, also let them exit."""
        for number in alive:
            self.inboxes[number].put(None)
        waiting = set(alive)
        deadline = time.monotonic() + EXIT_WAIT_S
        while waiting and time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                waiting = {n for n in waiting if self.procs[n].is_alive()}
                continue
            if event[0] == "idle":
                waiting.discard(event[1])
                self.idle[event[1]] = True
        for number in waiting:  # stuck: never reused
            self.procs[number].kill()
        if not keep:
            self.close()

    def close(self, wait_s: float = EXIT_WAIT_S) -> None:
        """Let every worker exit (waiting at most `wait_s`), then kill what is left: workers
        ignore SIGTERM (stops.py)."""
        for number, proc in enumerate(self.procs):
            if proc is not None and proc.is_alive():
                self.inboxes[number].put(None)  # ends its batches, or its wait for a next point
                self.inboxes[number].put(None)
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=wait_s)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        self.procs = [None] * len(self.devices)


_crews: dict[str, Crew] = {}  # at most one: the crew of the last run, kept for the next point


def crew_for(spec: WorkerSpec, devices: list[torch.device]) -> Crew:
    key = json.dumps([spec.model, spec.memory, spec.num_threads, [str(d) for d in devices]], sort_keys=True, default=str)
    crew = _crews.get(key)
    if crew is None:
        close_crews()  # another model or device set: free the devices first
        crew = _crews[key] = Crew(key, devices)
    return crew


@atexit.register
def close_crews() -> None:
    """Shut down kept worker processes (at exit, or before starting other ones)."""
    while _crews:
        _, crew = _crews.popitem()
        crew.close()


class Pool:
    def __init__(
        self, batches: list[list[PlannedItem]], spec: WorkerSpec, devices: list[torch.device], on_done: OnDone,
        stop: Optional[StopRequest] = None, keep: bool = False,
    ):
        self.spec = spec
        self.devices = devices
        self.keep = keep
        self.ledger = Ledger(batches, RunStore(spec.run_dir, spec.output["format"]), on_done)
        # A signal asked the run to stop (stops.py): nothing new is handed out.
        self.stop = stop or StopRequest(0)

    def run(self) -> None:
        ledger, stop = self.ledger, self.stop
        crew = crew_for(self.spec, self.devices)
        crew.begin(self.spec)
        events, inboxes, procs = crew.events, crew.inboxes, crew.procs
        for number in range(len(procs)):
            ledger.join(number)
        clean = False
        try:
            self.hand_out(inboxes)
            while ledger.keep_going():
                if stop.requested and not ledger.interrupted:
                    ledger.interrupt()  # hand out nothing more; the workers finish what they hold
                    crew.stop.set()
                    for number in ledger.workers:
                        inboxes[number].put(None)  # wakes a worker waiting for work
                if ledger.interrupted and stop.abandon():
                    break
                try:
                    event = events.get(timeout=0.25)
                except queue.Empty:
                    event = None
                if event is not None:
                    self.handle(event)
                dead = [number for number in ledger.workers if not procs[number].is_alive()]
                if dead:
                    self.drain(events)  # what they reported before dying counts
                for number in dead:
                    ledger.died(number, f"exit code {procs[number].exitcode}")
                self.hand_out(inboxes)
            clean = not ledger.interrupted
        finally:
            if clean:
                crew.end_point(ledger.workers, self.keep)
            else:  # a signal or an error: no next point; after the grace, abandon what is left
                crew.close(0 if stop.abandon() else EXIT_WAIT_AFTER_STOP_S)
            if not (clean and self.keep):
                _crews.pop(crew.key, None)
        ledger.settle()  # after the workers are idle or gone: what they committed is on disk
        if ledger.load_errors and len(ledger.load_errors) == len(procs):
            raise NoWorkersLeft("no worker could load the model:\n" + "\n".join(ledger.load_errors))

    def hand_out(self, inboxes: list) -> None:
        for number in self.ledger.workers:
            for batch_id in self.ledger.hand_out(number):
                inboxes[number].put((batch_id, self.ledger.batches[batch_id]))

    def handle(self, event: tuple) -> None:
        kind, number = event[0], event[1]
        if kind == "done":
            self.ledger.done(number, event[2], event[3])
        elif kind == "loaded":
            log.info("worker %d (%s): loaded %s in %.2f s", number, self.devices[number], event[2], event[3])
        elif kind == "load_failed":
            self.ledger.load_failed(number, event[2])

    def drain(self, events: mp.Queue) -> None:
        while True:
            try:
                self.handle(events.get(timeout=0.2))
            except queue.Empty:
                return
