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
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.errors import ConfigError, RunDirError
from svdbatch.core.process import worker_env
from svdbatch.engine.dispatch import ASSIGNED_PER_WORKER, Ledger, OnDone
from svdbatch.engine.plan import PlannedItem
from svdbatch.engine.pool import NoWorkersLeft
from svdbatch.engine.ray_actor import ACTOR_NAME, SvdbatchWorker
from svdbatch.engine.ray_connection import RayConnection, resources_line
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.stops import StopRequest
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


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if name.startswith(FORWARDED_ENV_PREFIX)}


def batch_task_name(batch: list[PlannedItem]) -> str:
    """The name a batch's task has in the dashboard: which item it is."""
    first = batch[0].item.id if batch else "-"
    return f"item {first}" if len(batch) <= 1 else f"items {first} (+{len(batch) - 1})"


class RayCluster(RayConnection):
    """A run on the Ray cluster (RayConnection: joined on first use, left by close()):
    start the actors, check they share the run dir, feed them batches, stop them."""

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
