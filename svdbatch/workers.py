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
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from .config import MemoryConfig, ModelConfig, OutputConfig
from .models import ModelLoadError, load_pipeline
from .runner import DONE, FAILED, STOPPED, Outcome, Worker
from .schedule import PlannedItem
from .store import RunStore

log = logging.getLogger(__name__)

# Batches held by each worker: the one generating and the one whose images are loading.
ASSIGNED_PER_WORKER = 2
# A batch whose worker died is tried once more on another worker.
MAX_ATTEMPTS = 2


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

    def build(self, device: torch.device) -> Worker:
        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model)
        memory = OmegaConf.merge(OmegaConf.structured(MemoryConfig), self.memory)
        output = OmegaConf.merge(OmegaConf.structured(OutputConfig), self.output)
        store = RunStore(self.run_dir, output.format)
        loaded = load_pipeline(model, memory, device)
        return Worker(loaded, store, output, self.context, self.num_threads, self.step_progress, self.retry_on_oom)


OnDone = Callable[[list[Outcome]], None]


def execute(
    batches: list[list[PlannedItem]], spec: WorkerSpec, devices: list[torch.device], on_done: OnDone, keep: bool = False
) -> None:
    """Run every batch; `on_done(outcomes)` is called once per finished batch.
    `keep`: leave the worker processes (and their loaded pipelines) running for the next
    call with the same model, memory and devices: the next point of a sequential sweep."""
    if len(devices) == 1:
        lock = threading.Lock()

        def report(_: int, outcomes: list[Outcome]) -> None:
            with lock:
                on_done(outcomes)

        spec.build(devices[0]).run(enumerate(batches), report)
    else:
        Pool(batches, spec, devices, on_done, keep).run()


def worker_main(spec: WorkerSpec, device: str, number: int, inbox: mp.Queue, events: mp.Queue) -> None:
    """Entry point of a worker process: one run (a sweep point) per spec. After a point's
    last batch (None) it reports idle and waits for the next point's spec (None: exit);
    the pipeline stays loaded in between (models.load_pipeline keeps it)."""
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
            while (task := inbox.get()) is not None:
                yield task

        worker.run(batches(), lambda batch_id, outcomes: events.put(("done", number, batch_id, outcomes)))
        events.put(("idle", number))
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
                    args=(spec, str(device), number, self.inboxes[number], self.events),
                    name=f"svdbatch-worker-{number}",
                    daemon=True,
                )
                self.procs[number].start()
            self.idle[number] = False

    def end_point(self, alive: set[int], keep: bool) -> None:
        """After a run: tell the live workers the point is over and wait until each has
        committed what it holds (idle); without `keep`, also let them exit."""
        for number in alive:
            self.inboxes[number].put(None)
        waiting = set(alive)
        deadline = time.monotonic() + 60
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

    def close(self) -> None:
        for number, proc in enumerate(self.procs):
            if proc is not None and proc.is_alive() and self.idle[number]:
                self.inboxes[number].put(None)
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
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
        self, batches: list[list[PlannedItem]], spec: WorkerSpec, devices: list[torch.device], on_done: OnDone, keep: bool = False
    ):
        self.keep = keep
        self.batches = batches
        self.spec = spec
        self.devices = devices
        self.on_done = on_done
        self.store = RunStore(spec.run_dir, spec.output["format"])
        self.waiting: deque[int] = deque(range(len(batches)))
        self.attempts = [0] * len(batches)
        self.finished = 0
        self.load_errors: list[str] = []
        # Set when a worker stopped the run (disk full): nothing new is handed out.
        self.stop_reason: Optional[str] = None

    def run(self) -> None:
        crew = crew_for(self.spec, self.devices)
        crew.begin(self.spec)
        events, inboxes, procs = crew.events, crew.inboxes, crew.procs
        held: dict[int, list[int]] = {number: [] for number in range(len(procs))}
        alive: set[int] = set()
        for number in range(len(procs)):
            alive.add(number)
            self.assign(number, inboxes[number], held, ASSIGNED_PER_WORKER)
        try:
            while self.finished < len(self.batches) and alive:
                if self.stop_reason and not any(held.values()):
                    break
                try:
                    event = events.get(timeout=1.0)
                except queue.Empty:
                    event = None
                if event is not None:
                    self.handle(event, inboxes, held, alive)
                dead = [number for number in alive if not procs[number].is_alive()]
                if dead:
                    self.drain(events, inboxes, held, alive)  # what they reported before dying counts
                for number in dead:
                    if number in alive:
                        self.worker_died(number, procs[number].exitcode, held, alive, inboxes)
            if self.stop_reason:
                self.settle_waiting_as_stopped()
            elif self.finished < len(self.batches):
                self.abandon_waiting()
        finally:
            crew.end_point(alive, self.keep)
            if not self.keep:
                _crews.pop(crew.key, None)
        if self.load_errors and len(self.load_errors) == len(procs):
            raise NoWorkersLeft("no worker could load the model:\n" + "\n".join(self.load_errors))

    def assign(self, number: int, inbox: mp.Queue, held: dict[int, list[int]], up_to: int) -> None:
        while self.waiting and len(held[number]) < up_to and not self.stop_reason:
            batch_id = self.waiting.popleft()
            self.attempts[batch_id] += 1
            held[number].append(batch_id)
            inbox.put((batch_id, self.batches[batch_id]))

    def handle(self, event: tuple, inboxes, held, alive) -> None:
        kind, number = event[0], event[1]
        if kind == "done":
            batch_id, outcomes = event[2], event[3]
            held[number].remove(batch_id)
            self.finished += 1
            stopped = [o for o in outcomes if o.status == STOPPED]
            if stopped and not self.stop_reason:
                self.stop_reason = stopped[0].error
                log.error("worker %d stopped the run: %s", number, self.stop_reason)
            self.on_done(outcomes)
            self.assign(number, inboxes[number], held, ASSIGNED_PER_WORKER)
        elif kind == "loaded":
            log.info("worker %d (%s): loaded %s in %.2f s", number, self.devices[number], event[2], event[3])
        elif kind == "load_failed":
            log.error("worker %d could not start: %s", number, event[2])
            self.load_errors.append(event[2])
            self.attempts_back(held[number])
            self.requeue(held[number])
            held[number].clear()
            alive.discard(number)
            self.redistribute(inboxes, held, alive)

    def drain(self, events: mp.Queue, inboxes, held, alive) -> None:
        while True:
            try:
                self.handle(events.get(timeout=0.2), inboxes, held, alive)
            except queue.Empty:
                return

    def worker_died(self, number: int, exitcode: Optional[int], held, alive, inboxes) -> None:
        log.error("worker %d died (exit code %s) holding batches %s", number, exitcode, held[number])
        alive.discard(number)
        self.skip_committed(held[number])
        self.requeue(held[number], reason=f"worker {number} died (exit code {exitcode})")
        held[number].clear()
        self.redistribute(inboxes, held, alive)

    def skip_committed(self, batch_ids: list[int]) -> None:
        """A worker can die after committing an item but before its report arrived: those
        items are done on disk, so they are counted, not redone."""
        index = self.store.finished_index()
        for batch_id in list(batch_ids):
            done = [e for e in self.batches[batch_id] if self.store.is_done(e.item.id, e.key, index)]
            if not done:
                continue
            self.batches[batch_id] = [e for e in self.batches[batch_id] if e not in done]
            self.on_done([Outcome(e.item.id, DONE) for e in done])
            if not self.batches[batch_id]:
                batch_ids.remove(batch_id)
                self.finished += 1

    def requeue(self, batch_ids: list[int], reason: Optional[str] = None) -> None:
        for batch_id in batch_ids:
            if reason is not None and self.attempts[batch_id] >= MAX_ATTEMPTS:
                self.give_up(batch_id, f"{reason}, {self.attempts[batch_id]} attempts")
            else:
                self.waiting.appendleft(batch_id)

    def attempts_back(self, batch_ids: list[int]) -> None:
        for batch_id in batch_ids:  # never started, so it was not an attempt
            self.attempts[batch_id] -= 1

    def redistribute(self, inboxes, held, alive) -> None:
        for number in alive:
            self.assign(number, inboxes[number], held, ASSIGNED_PER_WORKER)

    def give_up(self, batch_id: int, error: str) -> None:
        outcomes = []
        for entry in self.batches[batch_id]:
            self.store.record_failure(entry.item.id, entry.key, error, {"line": entry.item.line})
            outcomes.append(Outcome(entry.item.id, FAILED, error=error))
        self.finished += 1
        self.on_done(outcomes)

    def settle_waiting_as_stopped(self) -> None:
        while self.waiting:
            batch_id = self.waiting.popleft()
            self.finished += 1
            self.on_done([Outcome(e.item.id, STOPPED, error=self.stop_reason) for e in self.batches[batch_id]])

    def abandon_waiting(self) -> None:
        while self.waiting:
            self.give_up(self.waiting.popleft(), "no live worker left; left for the next run to resume")
