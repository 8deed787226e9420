"""The worker process's side of engine/crews.py and pool.py: build a Worker from a spec,
resolve the devices for the driver, and serve batches until told to stop.

It imports torch and diffusers (through the worker and models), so only worker processes
(and a caller that has imported torch already) import it; crews.py and pool.py name it by
function.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import threading
import traceback
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from svdbatch.core import faults
from svdbatch.core.config import MemoryConfig, ModelConfig, OutputConfig, typed
from svdbatch.core.errors import ConfigError
from svdbatch.core.quality import QualityConfig
from svdbatch.engine.plan import PlannedItem
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.stops import die_with_parent, ignore_stop_signals
from svdbatch.engine.worker import Worker
from svdbatch.models.devices import resolve_devices
from svdbatch.models.identity import default_num_threads
from svdbatch.models.loading import load_pipeline
from svdbatch.models.tiny import TINY_SOURCE, ensure_tiny_model
from svdbatch.rundir.store import RunStore


def build_worker(spec: WorkerSpec, device: Any) -> Worker:
    """The Worker a spec describes, with its pipeline loaded on `device`."""
    device = torch.device(device)
    model, memory, output = typed(ModelConfig, spec.model), typed(MemoryConfig, spec.memory), typed(OutputConfig, spec.output)
    store = RunStore(spec.run_dir, output.format)
    loaded = load_pipeline(model, memory, device)
    quality = QualityConfig(**spec.quality) if spec.quality else None
    return Worker(
        loaded,
        store,
        output,
        spec.context,
        spec.num_threads,
        spec.step_progress,
        spec.retry_on_oom,
        quality,
        keep_replaced_in=spec.keep_replaced_in,
    )


def resolve_device_names(devices: Any, workers: int) -> list[str]:
    return [str(device) for device in resolve_devices(devices, workers)]


class ForwardLogs(logging.handlers.QueueHandler):
    """In a worker process: log records go to the driver (events queue), which hands them
    to its own handlers: svdbatch.log and the console, above the progress bar."""

    queue: mp.Queue  # the events queue given below (QueueHandler types it as any queue-like)

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
        devices = resolve_device_names(spec.devices, spec.workers)
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
    spec: WorkerSpec,
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
    of an early crew, which resolves the devices first (resolve_for_driver)."""
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
    if device is None:
        assert setup is not None  # Crew.start gives every worker the setup queue
        resolved = resolve_for_driver(spec, setup)
        if resolved is None:
            return
        device, spec = resolved
    while spec is not None:
        try:
            worker = build_worker(spec, device)
        except BaseException as exc:
            events.put(("load_failed", number, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return

        def batches() -> Iterator[tuple[int, list[PlannedItem]]]:
            while not stop.is_set() and (task := inbox.get()) is not None:
                yield task

        worker.run(batches(), lambda batch_id, outcomes: events.put(("done", number, batch_id, outcomes)), stop=stop.is_set)
        events.put(("idle", number))
        if stop.is_set():
            return
        spec = inbox.get()
