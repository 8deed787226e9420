"""Run batches on one worker (in this process) or one worker process per device.

A command started fresh (the CLI) never imports torch in the driver: its first worker
process starts before the manifest is read, imports torch and diffusers, resolves
run.devices, reports them, and loads the model on the other core while the driver checks
the manifest and plans (an early crew: Crew.start_first). A restart of a 100k-row run
reaches its first item in about the time the slower of the two takes, not their sum.
A process that has imported torch already (a library caller, the tests) runs a single
worker in-process instead: nothing is left to overlap.

Why spawned processes with a queue per worker, and not accelerate's PartialState or a
shared queue: each process owns one device and loads the pipeline once, exactly like the
single-device path (same `Worker` object). The parent hands out batches one at a time as
workers report them done (pull-based, so a slow item never stalls the others), and
because it always knows which batches a worker holds, a worker that dies loses nothing:
its batches go back to the queue once, then are recorded as failed and left for resume.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import logging.handlers
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (before our atexit hook below: see close_crews)
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from . import faults
from .config import ConfigError, MemoryConfig, ModelConfig, OutputConfig
from .dispatch import Ledger, OnDone
from .models import ModelLoadError, default_num_threads, resolve_devices
from .outcomes import Outcome
from .plan import PlannedItem
from .process import own_process
from .stops import StopRequest, die_with_parent, ignore_stop_signals, stop_signals_blocked
from .store import RunStore
from .tiny import TINY_SOURCE, ensure_tiny_model

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)

# How long a worker may take to exit once it has nothing left to do, before it is killed.
EXIT_WAIT_S = 60
# After a stop, workers have reported everything they held: they only need to exit.
EXIT_WAIT_AFTER_STOP_S = 10
# A worker process that dies (a segfault, the OOM killer) is replaced, so that one bad item
# does not stop the batch; its batches are retried (dispatch.MAX_ATTEMPTS). Not after this
# many deaths in a row with no batch done in between: something is wrong with every item.
MAX_RESTARTS_IN_A_ROW = 3


class NoWorkersLeft(ModelLoadError):
    pass


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain picklable data."""

    model: dict[str, Any]
    memory: dict[str, Any]
    output: dict[str, Any]
    run_dir: str
    # None: models.default_num_threads for the resolved devices, worked out by the first
    # worker of an early crew and then given to every worker (it changes float results).
    num_threads: int | None
    step_progress: bool
    context: dict[str, Any]
    retry_on_oom: bool = False
    # run.keep_replaced: where a redone item's older output is moved before the new one is written.
    keep_replaced_in: str | None = None
    # run.devices and run.workers as configured: the first worker of an early crew resolves them.
    devices: Any = "auto"
    workers: int = 1

    def build(self, device: Any) -> Worker:
        import torch

        from .models import load_pipeline
        from .worker import Worker

        device = torch.device(device)
        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model)
        memory = OmegaConf.merge(OmegaConf.structured(MemoryConfig), self.memory)
        output = OmegaConf.merge(OmegaConf.structured(OutputConfig), self.output)
        store = RunStore(self.run_dir, output.format)
        loaded = load_pipeline(model, memory, device)
        worker = Worker(loaded, store, output, self.context, self.num_threads, self.step_progress, self.retry_on_oom)
        worker.keep_replaced_in = self.keep_replaced_in
        return worker


def torch_is_loaded() -> bool:
    """This process has imported torch already: a worker here costs nothing extra to start."""
    return "torch" in sys.modules


def runs_in_processes(spec: WorkerSpec) -> bool:
    """Whether a local run takes an early crew (start_early): in a driver without torch, and
    whenever a crew kept from the last sweep point fits (the driver may have imported torch
    since, e.g. to check memory.compile's settings: the kept pipeline must not load twice)."""
    return not torch_is_loaded() or crew_key(spec) in _crews


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

        with stop.nothing_in_flight():  # a signal while the model loads need not wait for it
            worker = spec.build(devices[0])
        worker.run(enumerate(batches), report, stop=stop.is_requested, abandon=stop.abandon)
    else:
        Pool(batches, spec, crew or crew_for(spec, devices), on_done, stop, keep).run()


class ForwardLogs(logging.handlers.QueueHandler):
    """In a worker process: log records go to the driver (events queue), which hands them
    to its own handlers: svdbatch.log and the console, above the progress bar."""

    def __init__(self, events: mp.Queue, number: int):
        super().__init__(events)
        self.number = number

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", self.number, record))


def resolve_for_driver(spec: WorkerSpec, setup: mp.Queue) -> tuple[str, WorkerSpec] | None:
    """The first worker of an early crew: resolve run.devices (this needs torch, which the
    driver does without) and the thread count, and report both on `setup`; the embedded
    tiny model is built first if it is not cached yet, so that the driver, which hashes it
    into every key, need not build it (with torch) at the same time. Returns this
    worker's device and its spec with the thread count filled in; None if it failed."""
    try:
        devices = [str(device) for device in resolve_devices(spec.devices, spec.workers)]
        spec = replace(spec, num_threads=spec.num_threads or default_num_threads(devices))
        if spec.model.get("source") == TINY_SOURCE:  # built here on first use: the driver hashes it
            ensure_tiny_model(spec.model.get("cache_dir"))
    except ConfigError as exc:
        setup.put(("config_error", str(exc)))
        return None
    except BaseException as exc:
        setup.put(("error", f"{type(exc).__name__}: {exc}"))
        return None
    setup.put(("devices", devices, spec.num_threads))
    return devices[0], spec


def worker_main(
    spec: WorkerSpec | None,
    device: str | None,
    number: int,
    inbox: mp.Queue,
    events: mp.Queue,
    stop: Any,
    driver_pid: int,
    setup: mp.Queue | None = None,
) -> None:
    """Entry point of a worker process: one run (a sweep point) per spec. After a point's
    last batch (None) it reports idle and waits for the next point's spec (None: exit); the
    pipeline stays loaded in between (models.load_pipeline keeps it). `stop` (an Event) is
    set by the driver after a signal: no new batch starts. `device` None: the first worker
    of an early crew, which resolves the devices first (resolve_for_driver); with `spec`
    None too, a spare (prestart) that imports torch and then waits for its spec."""
    own_process()  # before torch loads: a library caller's own environment lacks our defaults
    ignore_stop_signals()
    die_with_parent(driver_pid)
    faults.set_driver(driver_pid)
    root = logging.getLogger()
    root.handlers[:] = [ForwardLogs(events, number)]
    root.setLevel(logging.INFO)
    # tqdm (diffusers' step bars) would create a cross-process lock, registered with the
    # driver's resource tracker; a worker killed after a stop's grace would leave it
    # registered, and the tracker warns at exit. A worker needs no lock across processes.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if spec is None and device is None:  # a spare (prestart): torch now, the spec meanwhile
        importlib.import_module("torch")  # resolving the devices needs it, and the driver waits for that
        spec = inbox.get()
    if device is None and spec is not None:
        resolved = resolve_for_driver(spec, setup)
        if resolved is None:
            return
        device, spec = resolved
    while spec is not None:
        try:
            worker = spec.build(device)
        except BaseException as exc:
            events.put(("load_failed", number, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return

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
    sweep load the pipeline (and warm up a compiled UNet) once per device, not once per point.

    An early crew (start_first) knows no devices yet: its first worker resolves them
    while the driver plans, and `resolved()` waits for that report."""

    def __init__(self, key: str, devices: list[str] | None = None, num_threads: int | None = None):
        self.key = key
        self.devices = devices
        self.num_threads = num_threads
        self.context = mp.get_context("spawn")  # CUDA cannot be forked; spawn is also the CPU path
        self.events = self.context.Queue()
        self.setup = self.context.Queue()  # the first worker's report of the resolved devices
        self.stop = self.context.Event()  # set after a signal: workers start no new batch
        size = len(devices) if devices else 1
        self.inboxes: list[Any] = [None] * size
        self.procs: list[Any] = [None] * size
        self.idle: list[bool] = [False] * size
        # Workers started for the coming point, with its spec: begin() leaves them be.
        self.fresh: set[int] = set()

    def start(self, number: int, spec: WorkerSpec, device: str | None) -> None:
        self.inboxes[number] = self.context.Queue()
        self.procs[number] = self.context.Process(
            target=worker_main,
            args=(spec, device, number, self.inboxes[number], self.events, self.stop, os.getpid(), self.setup),
            name=f"svdbatch-worker-{number}",
            daemon=True,
        )
        with stop_signals_blocked():  # a Ctrl-C cannot kill it while it imports
            self.procs[number].start()
        self.idle[number] = False

    def start_first(self, spec: WorkerSpec) -> None:
        """Start worker 0 now, before the devices are known (it resolves them)."""
        self.start(0, spec, None)
        self.fresh.add(0)

    def resolved(self) -> tuple[list[str], int]:
        """The devices (one per worker) and thread count, once the first worker reports
        them; a run.devices it refused is a ConfigError here, as in the driver."""
        while self.devices is None:
            try:
                report = self.setup.get(timeout=0.25)
            except queue.Empty:
                if not self.procs[0].is_alive():
                    raise ModelLoadError(f"worker 0 exited (code {self.procs[0].exitcode}) before it could start") from None
                continue
            if report[0] == "config_error":
                raise ConfigError(report[1])
            if report[0] != "devices":
                raise ModelLoadError(f"worker 0 could not start: {report[1]}")
            self.devices, self.num_threads = report[1], report[2]
            more = len(self.devices) - 1
            self.inboxes += [None] * more
            self.procs += [None] * more
            self.idle += [False] * more
        return self.devices, self.num_threads

    def begin(self, spec: WorkerSpec) -> None:
        """Hand the point's spec to every worker: idle live ones get it by message, missing
        or dead ones are (re)started with it."""
        for number, device in enumerate(self.devices):
            proc = self.procs[number]
            if number in self.fresh:  # if it died, its report says why (load_failed) or the pool sees it dead
                continue
            if proc is not None and proc.is_alive() and self.idle[number]:
                self.inboxes[number].put(spec)
                self.idle[number] = False
            else:
                if proc is not None and proc.is_alive():
                    proc.kill()
                self.start(number, spec, device)
        self.fresh.clear()

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
            elif event[0] == "log":
                log_from_worker(event[2], event[1], len(self.procs))
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
        self.procs = [None] * len(self.procs)
        self.fresh.clear()


def log_from_worker(record: logging.LogRecord, number: int, workers: int) -> None:
    """A worker's log record, through this process's handlers (named by worker when several)."""
    if workers > 1:
        record.msg, record.args = f"worker {number}: {record.getMessage()}", None
    logging.getLogger(record.name).handle(record)


_crews: dict[str, Crew] = {}  # at most one: the crew of the last run, kept for the next point


def crew_key(spec: WorkerSpec) -> str:
    """What a crew's workers were built from, as configured (not resolved): a sweep's points
    with equal settings share the crew."""
    return json.dumps([spec.model, spec.memory, spec.num_threads, spec.devices, spec.workers], sort_keys=True, default=str)


def crew_for(spec: WorkerSpec, devices: list[str] | None = None) -> Crew:
    """The kept crew for these settings, or a new one (for `devices`, or early: devices unknown)."""
    key = crew_key(spec)
    crew = _crews.get(key)
    if crew is None:
        close_crews()  # another model or device set: free the devices first
        crew = _crews[key] = Crew(key, devices, spec.num_threads)
    return crew


_spare: Crew | None = None  # prestart's worker, until a run adopts it (start_early)


def prestart() -> None:
    """Start the first worker before the config is composed (the CLI, about to run): it
    imports torch meanwhile, then takes the run's spec (start_early), reports the devices
    the driver plans with, and imports diffusers and loads the model.
    Not adopted (no run after all, another engine): killed (discard_spare, or at exit)."""
    global _spare
    if _spare is None and not torch_is_loaded():
        _spare = Crew("")
        _spare.start(0, None, None)


def discard_spare() -> None:
    global _spare
    if _spare is not None:
        _spare.close(0)
        _spare = None


def start_early(spec: WorkerSpec) -> Crew:
    """The crew for a run whose driver has not imported torch: the kept one of the last
    sweep point with the same settings, else the prestarted spare (given the spec now), else
    a new one whose first worker starts now."""
    global _spare
    key = crew_key(spec)
    if key not in _crews and _spare is not None:
        crew, _spare = _spare, None
        close_crews()  # another model or device set: free the devices first
        crew.key, crew.num_threads = key, spec.num_threads
        _crews[key] = crew
        crew.inboxes[0].put(spec)
        crew.fresh.add(0)
        return crew
    discard_spare()
    crew = crew_for(spec)
    if crew.devices is None and crew.procs[0] is None:
        crew.start_first(spec)
    return crew


def discard_unused(crew: Crew) -> None:
    """A run that started an early crew but hands it no work (nothing to do, or it failed
    before): stop the worker still loading, rather than wait for a model nobody needs."""
    if crew.fresh:
        crew.close(0)
        _crews.pop(crew.key, None)


@atexit.register
def close_crews() -> None:
    """Shut down kept worker processes (at exit, or before starting other ones). At exit it
    must run before multiprocessing's own hook, which SIGTERMs daemon children and waits for
    them: workers ignore SIGTERM. atexit runs hooks last-registered first, hence the import
    of multiprocessing.util above."""
    while _crews:
        _, crew = _crews.popitem()
        crew.close()
    discard_spare()


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
        self.ledger = Ledger(batches, RunStore(spec.run_dir, spec.output["format"]), on_done)
        # A signal asked the run to stop (stops.py): nothing new is handed out.
        self.stop = stop or StopRequest(0)
        self.deaths_in_a_row = 0

    def run(self) -> None:
        ledger, stop = self.ledger, self.stop
        crew = self.crew
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
                    self.replace(number)
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
