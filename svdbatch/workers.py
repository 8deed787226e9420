"""Run batches on one worker (in this process) or one worker process per device.

Why spawned processes with a queue per worker, and not accelerate's PartialState or a
shared queue: each process owns one device and loads the pipeline once, exactly like the
single-device path (same `Worker` object). The parent hands out batches one at a time as
workers report them done (pull-based, so a slow item never stalls the others), and
because it always knows which batches a worker holds, a worker that dies loses nothing:
its batches go back to the queue once, then are recorded as failed and left for resume.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from .config import MemoryConfig, ModelConfig, OutputConfig
from .dispatch import Ledger, OnDone
from .models import ModelLoadError, load_pipeline
from .runner import Outcome, Worker
from .schedule import PlannedItem
from .store import RunStore

log = logging.getLogger(__name__)


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


def execute(batches: list[list[PlannedItem]], spec: WorkerSpec, devices: list[torch.device], on_done: OnDone,
            cluster: Any = None) -> None:
    """Run every batch; `on_done(outcomes)` is called once per finished batch. With a Ray
    cluster (ray_engine.RayCluster, run.engine=ray) its actors run them instead."""
    if cluster is not None:
        cluster.execute(batches, spec, on_done)
    elif len(devices) == 1:
        lock = threading.Lock()

        def report(_: int, outcomes: list[Outcome]) -> None:
            with lock:
                on_done(outcomes)

        spec.build(devices[0]).run(enumerate(batches), report)
    else:
        Pool(batches, spec, devices, on_done).run()


def worker_main(spec: WorkerSpec, device: str, number: int, inbox: mp.Queue, events: mp.Queue) -> None:
    """Entry point of a worker process."""
    try:
        worker = spec.build(torch.device(device))
    except BaseException as exc:
        events.put(("load_failed", number, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return

    def batches():
        while (task := inbox.get()) is not None:
            yield task

    worker.run(batches(), lambda batch_id, outcomes: events.put(("done", number, batch_id, outcomes)))
    events.put(("exited", number))


class Pool:
    def __init__(self, batches: list[list[PlannedItem]], spec: WorkerSpec, devices: list[torch.device], on_done: OnDone):
        self.spec = spec
        self.devices = devices
        self.ledger = Ledger(batches, RunStore(spec.run_dir, spec.output["format"]), on_done)

    def run(self) -> None:
        ledger = self.ledger
        context = mp.get_context("spawn")  # CUDA cannot be forked; spawn is also the CPU path
        events = context.Queue()
        inboxes = [context.Queue() for _ in self.devices]
        procs = [
            context.Process(
                target=worker_main,
                args=(self.spec, str(device), number, inboxes[number], events),
                name=f"svdbatch-worker-{number}",
                daemon=True,
            )
            for number, device in enumerate(self.devices)
        ]
        for number, proc in enumerate(procs):
            proc.start()
            ledger.join(number)
        self.hand_out(inboxes)
        try:
            while ledger.keep_going():
                try:
                    event = events.get(timeout=1.0)
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
            ledger.settle()
        finally:
            for number in ledger.workers:
                inboxes[number].put(None)
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
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
        elif kind == "load_failed":
            self.ledger.load_failed(number, event[2])

    def drain(self, events: mp.Queue) -> None:
        while True:
            try:
                self.handle(events.get(timeout=0.2))
            except queue.Empty:
                return
