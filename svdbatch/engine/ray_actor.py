"""The body of a Ray actor (run.engine=ray): the local `Worker`, fed one batch per call.

ray_engine.py (the driver's side) starts one per device and feeds it; this module is what
runs inside the actor's process, on whichever node Ray placed it.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
import torch

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.outcomes import Outcome
from svdbatch.engine.plan import PlannedItem
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.worker_process import build_worker
from svdbatch.rundir.store import RunStore

ACTOR_NAME = "svdbatch-worker-{}"  # as shown in the Ray dashboard and `ray list actors`


class SvdbatchWorker:
    """The body of a Ray actor: the local `Worker`, fed one batch per call. Calls are
    concurrent (a threaded actor), so while one batch generates the next one's images load,
    exactly as in a local worker process."""

    def __init__(self, spec: WorkerSpec, number: int, device: str):
        # svdbatch's own messages (model loaded, item failed) go to the actor's stderr, which
        # Ray forwards to the driver; other libraries keep their own logging settings.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(levelname)s {ACTOR_NAME.format(number)} %(name)s: %(message)s"))
        root = logging.getLogger("svdbatch")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        self.spec = spec
        self.number = number
        self.device = device
        self.inbox: queue.Queue = queue.Queue()
        self.reports: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.broken: str | None = None

    def node(self) -> dict[str, Any]:
        return {"hostname": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def probe(self, driver_probe: str, token: str, image: str | None) -> dict[str, Any]:
        """Shared-storage check: read the driver's probe, write our own for the driver to read."""
        info = {**self.node(), "problems": [], "probe": None}
        try:
            seen = Path(driver_probe).read_text(encoding="utf-8")
        except OSError as exc:
            info["problems"].append(f"cannot read the driver's probe file {driver_probe} ({type(exc).__name__}: {exc})")
        else:
            if seen != token:
                info["problems"].append(f"{driver_probe} holds another run's probe: a different file system is mounted there")
        if not info["problems"]:
            store = RunStore(self.spec.run_dir, self.spec.output["format"])
            mine = store.probe_path(f"actor-{self.number}")
            try:
                atomic_write_bytes(mine, f"{token} {self.number}".encode())
                info["probe"] = str(mine)
            except OSError as exc:
                info["problems"].append(f"cannot write into the run dir ({type(exc).__name__}: {exc})")
        if image is not None and not os.path.isfile(image):
            info["problems"].append(f"cannot see image {image} (the manifest's images must be on shared storage too, or be URLs)")
        return info

    def start(self) -> dict[str, Any]:
        """Load the pipeline (once) and start serving batches."""
        worker = build_worker(self.spec, torch.device(self.device))
        threading.Thread(target=self._serve, args=(worker,), name="svdbatch-run", daemon=True).start()
        return self.node()

    def _serve(self, worker: Any) -> None:
        try:
            worker.run(iter(self.inbox.get, None), self._report)
            reason = "worker stopped"
        except BaseException as exc:  # a bug, not an item's failure: the driver retires this actor
            logging.getLogger(__name__).exception("worker loop failed")
            reason = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.broken = reason
            waiting, self.reports = self.reports, {}
        for future in waiting.values():
            future.set_exception(RuntimeError(reason))

    def _report(self, batch_id: int, outcomes: list[Outcome]) -> None:
        with self.lock:
            future = self.reports.pop(batch_id, None)
        if future is not None:
            future.set_result(outcomes)

    def run_batch(self, batch_id: int, batch: list[PlannedItem]) -> list[Outcome]:
        future: Future = Future()
        with self.lock:
            if self.broken:
                raise RuntimeError(self.broken)
            self.reports[batch_id] = future
        self.inbox.put((batch_id, batch))
        return future.result()
