"""The worker processes of a local run (Crew): one per device, started (the first one early,
before the devices are known), watched until they exit, and kept between the points of a
sweep that share what they were built from. Handing them batches: pool.py.

A command started fresh (the CLI) never imports torch in the driver: its first worker
process starts before the manifest is read, imports torch and diffusers, resolves
run.devices, reports them, and loads the model on the other core while the driver checks
the manifest and plans (an early crew: Crew.start_first). A restart of a 100k-row run
reaches its first item in about the time the slower of the two takes, not their sum.
A process that has imported torch already (a library caller, the tests) runs a single
worker in-process instead: nothing is left to overlap.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (before our atexit hook below: see close_crews)
import os
import queue
import sys
import time
from typing import Any

from svdbatch.core.errors import ConfigError, ModelLoadError
from svdbatch.core.process import own_process
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.stops import stop_signals_blocked

# How long a worker may take to exit once it has nothing left to do, before it is killed.
EXIT_WAIT_S = 60


def torch_is_loaded() -> bool:
    """This process has imported torch already: a worker here costs nothing extra to start."""
    return "torch" in sys.modules


def runs_in_processes(spec: WorkerSpec) -> bool:
    """Whether a local run takes an early crew (start_early): in a driver without torch, and
    whenever a crew kept from the last sweep point fits (the driver may have imported torch
    since, e.g. to check memory.compile's settings: the kept pipeline must not load twice)."""
    return not torch_is_loaded() or crew_key(spec) in _crews


def worker_main(*args: Any) -> None:
    """Entry point of a worker process (engine/worker_process.py): imported there, in the
    worker, so that this module (the driver's side) never imports torch."""
    own_process()  # before torch loads: a library caller's own environment lacks our defaults
    from svdbatch.engine.worker_process import worker_main as main

    main(*args)


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

    def resolved(self) -> tuple[list[str], int | None]:
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
        assert self.devices is not None  # known from the start, or resolved() first
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


def start_early(spec: WorkerSpec) -> Crew:
    """The crew for a run whose driver has not imported torch: the kept one of the last
    sweep point with the same settings, else a new one whose first worker starts now (it
    resolves the devices and loads the model while the driver checks the input and plans)."""
    crew = crew_for(spec)
    if crew.devices is None and crew.procs[0] is None:
        crew.start_first(spec)
    return crew


def discard_unused(crew: Crew) -> None:
    """A run that started an early crew but hands it no work (nothing to do, or it failed
    before): stop the worker still loading, rather than wait for a model nobody needs."""
    if crew.fresh:
        crew.close(0)
        forget(crew)


def let_go(spec: WorkerSpec) -> None:
    """Close the crew a run kept for a second round it turned out not to need."""
    crew = _crews.pop(crew_key(spec), None)
    if crew is not None:
        crew.close()


@atexit.register
def close_crews() -> None:
    """Shut down kept worker processes (at exit, or before starting other ones). At exit it
    must run before multiprocessing's own hook, which SIGTERMs daemon children and waits for
    them: workers ignore SIGTERM. atexit runs hooks last-registered first, hence the import
    of multiprocessing.util above."""
    while _crews:
        _, crew = _crews.popitem()
        crew.close()


def forget(crew: Crew) -> None:
    """Keep `crew` no longer for a next point (it is closed, or being closed)."""
    _crews.pop(crew.key, None)
