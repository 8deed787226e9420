"""run.engine=ray: the same run on a Ray cluster, for several machines without Slurm.

The driver (this process) plans as usual, then starts one actor per GPU of the cluster (or
run.workers CPU actors). Each actor holds the very same `Worker` the local pool uses
(WorkerSpec.build: one pipeline load per actor) and is fed batches pull-based, two at a
time, as it reports them done; the bookkeeping (who holds which batch, a dead actor's
batches tried once more elsewhere, then recorded as failed) is dispatch.Ledger, shared
with the local pool. Actors write into the run dir themselves, so before any work the
driver checks that every actor's node sees the run dir (and the images) at the same path.

Ray is optional (pip install "svdbatch[ray]"): it is imported only here, only when used.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.errors import ConfigError, RunDirError
from svdbatch.core.process import worker_env
from svdbatch.engine.dispatch import ASSIGNED_PER_WORKER, Ledger, OnDone
from svdbatch.engine.plan import PlannedItem
from svdbatch.engine.pool import NoWorkersLeft
from svdbatch.engine.ray_actor import ACTOR_NAME, SvdbatchWorker
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.stops import StopRequest
from svdbatch.models.devices import parse_device
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the driver looks up from waiting (signals, start timeout)
# svdbatch's own environment (tiny-model cache, fault injection) reaches every actor;
# anything else (HF_HOME, HF_TOKEN, ...) is the cluster's or the job's runtime env.
FORWARDED_ENV_PREFIX = "SVDBATCH_"
SHARED_STORAGE_HINT = (
    "every node must see the run dir at the same path: put run.dir on a shared file system "
    "(NFS, EFS, Filestore, Lustre, or a ReadWriteMany volume mounted at the same path in every pod)"
)


def actor_devices(devices: Any, workers: int, cluster_gpus: int) -> list[torch.device]:
    """One entry per actor, as run.devices reads on a cluster: "auto" = one per GPU of the
    cluster (else run.workers CPU actors), n = n GPU actors (an autoscaling cluster adds the
    nodes), a list = one actor per entry ("cpu" or a GPU; Ray picks which GPU)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if devices == "auto" or devices is None:
        return [cuda] * cluster_gpus if cluster_gpus else [cpu] * max(1, workers)
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ConfigError(f"run.devices: must be at least 1 GPU, got {devices}")
        return [cuda] * devices
    names = [devices] if isinstance(devices, str) else list(devices)
    if not names:
        raise ConfigError("run.devices is empty")
    resolved = []
    for name in names:
        device = parse_device(name)
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"run.devices: {name!r}: a Ray actor runs on 'cpu' or a GPU")
        resolved.append(cuda if device.type == "cuda" else cpu)
    return resolved


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if name.startswith(FORWARDED_ENV_PREFIX)}


def batch_task_name(batch: list[PlannedItem]) -> str:
    """The name a batch's task has in the dashboard: which item it is."""
    first = batch[0].item.id if batch else "-"
    return f"item {first}" if len(batch) <= 1 else f"items {first} (+{len(batch) - 1})"


class RayCluster:
    """The Ray cluster of one run: joined (or started) on first use, left by close()."""

    def __init__(self, run_cfg: Any):
        self.cfg = run_cfg.ray
        self.devices_setting = run_cfg.devices
        self.workers = run_cfg.workers
        self.connected_here = False
        self._devices: list[torch.device] | None = None

    # -- connection -------------------------------------------------------------------
    def connect(self) -> None:
        if ray.is_initialized():  # e.g. a notebook or test that called ray.init itself: use it, keep it
            return
        kwargs: dict[str, Any] = {"address": self.cfg.address, "log_to_driver": True}
        joining = cluster_to_join(self.cfg.address)
        if joining is not None:
            check_reachable(joining, self.cfg.address or os.environ.get("RAY_ADDRESS"))
        else:
            kwargs["include_dashboard"] = self.cfg.include_dashboard
            kwargs["num_cpus"] = self.cfg.num_cpus
            if self.cfg.object_store_mb is not None:
                kwargs["object_store_memory"] = self.cfg.object_store_mb * 2**20
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            context = ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.cfg.address or os.environ.get("RAY_ADDRESS") or "a local cluster"
            raise ConfigError(f"run.engine=ray: could not join {where} (run.ray.address): {exc}") from exc
        self.connected_here = True
        if threading.current_thread() is threading.main_thread():
            # ray.init installs a SIGTERM handler that exits at once; the driver's clean stop
            # (stops.py) stops the actors and says what is left, as for a local run.
            signal.signal(signal.SIGTERM, sigterm)
        log.info(
            "ray: %s %s (%s)",
            "joined" if joining else "started a local cluster at",
            # ray.init returns a RayContext here (a Ray Client ClientContext, for ray://, has no address_info).
            context.address_info.get("gcs_address"),  # type: ignore[attr-defined]
            resources_line(),
        )

    def close(self) -> None:
        """Leave the cluster; a local cluster this driver started is shut down with it."""
        if self.connected_here:
            ray.shutdown()
            self.connected_here = False

    def devices(self) -> list[torch.device]:
        """What each actor will run on (the driver plans item keys with the first one's dtype)."""
        if self._devices is None:
            self.connect()
            gpus = int(ray.cluster_resources().get("GPU", 0))
            self._devices = actor_devices(self.devices_setting, self.workers, gpus)
        return self._devices

    # -- the run ----------------------------------------------------------------------
    def execute(self, batches: list[list[PlannedItem]], spec: WorkerSpec, on_done: OnDone, stop: StopRequest) -> None:
        spec = replace(spec, run_dir=os.path.abspath(spec.run_dir))  # other nodes have another cwd
        store = RunStore(spec.run_dir, spec.output["format"])
        ledger: Ledger[str] = Ledger(batches, store, on_done, ASSIGNED_PER_WORKER)
        devices = self.devices()
        actors: list[Any] = []
        try:
            remote = ray.remote(SvdbatchWorker)
            # svdbatch's worker defaults too: an actor imports torch with this module, so
            # they must be in its environment from the start (process.worker_env).
            env = {"env_vars": {**worker_env(), **forwarded_env()}}
            for number, device in enumerate(devices):
                gpu = device.type == "cuda"
                actors.append(
                    remote.options(
                        name=ACTOR_NAME.format(number),
                        num_cpus=1,
                        num_gpus=1 if gpu else 0,
                        # run_batch twice (generating + loading) and a control call.
                        max_concurrency=ASSIGNED_PER_WORKER + 2,
                        max_restarts=0,  # a dead actor's batches are the ledger's to requeue, once
                        max_task_retries=0,
                        runtime_env=env,
                    ).remote(spec, number, "cuda:0" if gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
                )
            self.check_storage(actors, store, first_image(batches))
            self.serve(actors, ledger, stop)
        finally:
            stop_actors(actors)
        if ledger.load_errors and len(ledger.load_errors) == len(actors):
            raise NoWorkersLeft("no Ray actor could load the model:\n" + "\n".join(ledger.load_errors))

    def check_storage(self, actors: list[Any], store: RunStore, image: str | None) -> None:
        """Every actor reads the driver's probe file and writes its own, which the driver reads
        back: a run dir some node does not share is refused before any work (exit 2)."""

        token = uuid.uuid4().hex
        driver_probe = store.probe_path("driver")
        atomic_write_bytes(driver_probe, token.encode())
        written: list[Path] = [driver_probe]
        try:
            refs = {actor.probe.remote(str(driver_probe), token, image): number for number, actor in enumerate(actors)}
            results = self.wait_all(refs, "be placed on a node")
            problems = []
            for number, info in sorted(results.items()):
                where = f"{ACTOR_NAME.format(number)} on node {info['ip']} ({info['hostname']})"
                if info["probe"]:
                    written.append(Path(info["probe"]))
                    try:
                        seen = Path(info["probe"]).read_text(encoding="utf-8")
                    except OSError:
                        seen = None
                    if seen != f"{token} {number}":
                        info["problems"].append(
                            f"this driver ({socket.gethostname()}) cannot see the file it wrote, {info['probe']}"
                        )
                problems += [f"{where}: {problem}" for problem in info["problems"]]
            if problems:
                raise RunDirError(
                    f"run dir {store.root} is not shared with every Ray node:\n  "
                    + "\n  ".join(problems)
                    + f"\nWith run.engine=ray, {SHARED_STORAGE_HINT}."
                )
        finally:
            for path in written:
                path.unlink(missing_ok=True)

    def wait_all(self, refs: dict[Any, int], what: str) -> dict[int, Any]:
        """ray.get of every ref, bounded by run.ray.start_timeout_s (actors waiting for a node)."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            if time.monotonic() > deadline:
                missing = sorted(refs[ref] for ref in pending)
                raise ConfigError(
                    f"run.engine=ray: {len(missing)} of {len(refs)} actors did not {what} within "
                    f"run.ray.start_timeout_s={self.cfg.start_timeout_s:g} s (cluster: {resources_line()}); "
                    "ask for fewer (run.devices, run.workers) or add nodes"
                )
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:
                try:
                    results[refs[ref]] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise ConfigError(f"run.engine=ray: {ACTOR_NAME.format(refs[ref])} could not start: {cause(exc)}") from exc
        return results

    def serve(self, actors: list[Any], ledger: Ledger[str], stop: StopRequest) -> None:
        """Load the pipeline in every actor, then hand out batches as actors report them done.
        After a signal nothing more is handed out; the batches out are awaited until the grace
        is over (then the caller kills the actors, abandoning them)."""
        starting = {actor.start.remote(): number for number, actor in enumerate(actors)}
        numbers = {ACTOR_NAME.format(number): number for number in range(len(actors))}  # the ledger knows names
        running: dict[Any, tuple[int, int]] = {}  # ref -> (actor, batch id)
        while starting or ledger.keep_going():
            if stop.requested:
                ledger.interrupt()
                if not running or stop.abandon():
                    break
            if not starting and not running:
                break  # nothing out and nothing to hand out: settle() accounts for what is left
            ready, _ = ray.wait([*starting, *running], num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in starting:
                    self.started(actors, starting.pop(ref), ref, ledger)
                else:
                    self.finished(actors, *running.pop(ref), ref, ledger)
            for name in ledger.workers:
                number = numbers[name]
                for batch_id in ledger.hand_out(name):
                    batch = ledger.batches[batch_id]
                    ref = actors[number].run_batch.options(name=batch_task_name(batch)).remote(batch_id, batch)
                    running[ref] = (number, batch_id)
        ledger.settle()

    @staticmethod
    def started(actors: list[Any], number: int, ref: Any, ledger: Ledger[str]) -> None:
        """An actor finished loading the pipeline (it joins the ledger), or failed to."""
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            ledger.load_failed(ACTOR_NAME.format(number), cause(exc))
            ray.kill(actors[number], no_restart=True)
            return
        log.info("%s on %s (%s) loaded the model", ACTOR_NAME.format(number), info["ip"], info["hostname"])
        ledger.join(ACTOR_NAME.format(number))

    @staticmethod
    def finished(actors: list[Any], number: int, batch_id: int, ref: Any, ledger: Ledger[str]) -> None:
        """An actor's batch came back: its outcomes, or the actor died with it."""
        name = ACTOR_NAME.format(number)
        try:
            outcomes = ray.get(ref)
        except ray.exceptions.RayError as exc:
            ledger.died(name, cause(exc))  # a second failed call of the same actor is a no-op
            ray.kill(actors[number], no_restart=True)
            return
        ledger.done(name, batch_id, outcomes)


def cluster_to_join(address: str | None) -> str | None:
    """What ray.init(address) will join: "host:port", a "ray://" URL (Ray Client), or None
    when it starts a local cluster (only then do num_cpus and the object store apply)."""
    if address == "local":
        return None
    if address is not None and "://" in address:
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # moved in some Ray version: fall back on what the address says
        return address or os.environ.get("RAY_ADDRESS") or None
    try:
        # Ray annotates addr as str, but documents and handles None (RAY_ADDRESS, else a new cluster).
        return canonicalize_bootstrap_address(address)  # type: ignore[arg-type]
    except ConnectionError:
        return "auto"  # "auto" without a cluster: ray.init says so


def check_reachable(address: str, given: str | None, timeout_s: float = 10.0) -> None:
    """Ray retries an address nobody listens on for minutes; a plain TCP connect says at once."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"run.engine=ray: no Ray cluster answers at {given or address} ({exc}); check run.ray.address or RAY_ADDRESS "
            "(the head node's `ray start --head` prints it), or leave both unset to start a local cluster"
        ) from None


def resources_line() -> str:
    total = ray.cluster_resources()
    return f"{len(ray.nodes())} nodes, {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def first_image(batches: list[list[PlannedItem]]) -> str | None:
    """One image the actors must be able to read (planned from the driver's view)."""
    return next((entry.source for batch in batches for entry in batch if entry.source), None)


def cause(exc: BaseException) -> str:
    """The error behind a Ray wrapper, in one line (the actor's traceback went to its log)."""
    inner = getattr(exc, "cause", None)
    if isinstance(inner, BaseException):  # an exception raised in the actor's code
        return f"{type(inner).__name__}: {inner}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    node = next((line[3:].strip() for line in lines if line.startswith("ip:")), None)
    return f"{type(exc).__name__}: {lines[0] if lines else ''}" + (f" (node {node})" if node else "")


def stop_actors(actors: list[Any], wait_s: float = 30.0) -> None:
    """Kill every actor of this run and wait until Ray has them as dead, so none outlives the
    run (also after Ctrl+C or SIGTERM). Their items are committed or left claimable: a kill
    mid-write leaves only a temporary that the next run removes."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("ray.kill: %s", exc)
    deadline = time.monotonic() + wait_s
    for number in range(len(actors)):
        while time.monotonic() < deadline:
            try:
                ray.get_actor(ACTOR_NAME.format(number))
            except ValueError:
                break  # no live actor by that name
            time.sleep(0.1)
