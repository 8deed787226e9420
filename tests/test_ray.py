"""run.engine=ray on a real local Ray cluster (2 CPUs, shared by every test here).

The same guarantees as the local pool: frames equal a 1-worker local run, each item once,
a SIGKILLed actor loses nothing, a stopped driver leaves no actor behind, and a run dir
that some node does not see is refused before any work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from svdbatch import run
from svdbatch.cli import exit_code
from svdbatch.core.errors import EXIT_BAD_INPUT, EXIT_ITEMS_FAILED, ConfigError
from svdbatch.engine.prepare import load_manifest
from svdbatch.engine.ray_actor import ACTOR_NAME
from svdbatch.engine.ray_connection import actor_devices
from svdbatch.engine.ray_engine import batch_task_name, forwarded_env
from tests.conftest import FAST, REPO, make_cfg, make_image, write_csv

from .runfiles import failures_of, results_of, sidecar_file, video_rel

STEPS = "conditioning.num_inference_steps=4"  # slow enough to kill an actor mid-run
SETTINGS = [*FAST, STEPS, "run.num_threads=1", "fetch.retries=0"]
RAY_RUN = ["run.engine=ray", "run.workers=2"]


@pytest.fixture(scope="module")
def ray_address(tiny_cache) -> str:
    """One small local cluster for every test in this module (started here, so the CLI
    runs below join it, and the in-process runs use this process's connection)."""
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Eight good rows and one whose URL cannot be fetched (it fails inside a worker)."""
    root = tmp_path_factory.mktemp("ray-manifest")
    for n in range(8):
        make_image(root / "img" / f"{n}.png", seed=n)
    rows = [[f"i{n}", f"img/{n}.png", 100 + n] for n in range(8)] + [["unreachable", "http://127.0.0.1:9/x.png", 7]]
    return write_csv(root / "m.csv", ["id", "image", "seed"], rows)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, manifest) -> dict[str, str]:
    """Frames of a plain 1-worker local run."""
    run_dir = tmp_path_factory.mktemp("ray-reference") / "run"
    summary = run(make_cfg(f"manifest={manifest}", *SETTINGS, f"run.dir={run_dir}", fast=False))
    assert (summary.done, summary.failed) == (8, 1)
    return frame_hashes(run_dir)


def frame_hashes(run_dir: Path) -> dict[str, str]:
    return {r["id"]: r["frames_sha256"] for r in results_of(run_dir)}


def result_ids(run_dir: Path) -> list[str]:
    return sorted(r["id"] for r in results_of(run_dir))


GOOD = [f"i{n}" for n in range(8)]


def cli(args: list[str], cwd: Path = REPO, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "svdbatch", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        **popen,
    )


def wait_for_results(run_dir: Path, lines: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(results_of(run_dir)) >= lines:
            return
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    pytest.fail(f"no {lines} results in time (rc {proc.returncode}): {err[-3000:]}")


def actor_processes(root: int) -> list[psutil.Process]:
    """Live svdbatch actors under `root`. Ray names an actor's process after its class
    (ray::SvdbatchWorker, cut to 15 bytes) and titles it after the running task."""
    found = []
    for child in psutil.Process(root).children(recursive=True):
        try:
            if child.name().startswith("ray::SvdbatchWo") and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            pass
    return found


def svdbatch_actors_in_cluster() -> list[dict]:
    """Named svdbatch actors the cluster still has alive, in any job's namespace."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("svdbatch-worker-")]


def wait_until(predicate, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


# -- pure helpers ---------------------------------------------------------------------------
def test_actor_devices_read_run_devices_across_the_cluster():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert actor_devices("auto", workers=2, cluster_gpus=0) == [cpu, cpu]
    assert actor_devices("auto", workers=2, cluster_gpus=3) == [cuda] * 3  # one actor per GPU
    assert actor_devices(4, workers=1, cluster_gpus=0) == [cuda] * 4  # autoscaling: GPUs on demand
    assert actor_devices(["cpu", "cuda:3", 1], workers=1, cluster_gpus=0) == [cpu, cuda, cuda]
    with pytest.raises(ConfigError, match="run.devices"):
        actor_devices(["tpu"], workers=1, cluster_gpus=0)
    assert forwarded_env({"SVDBATCH_CACHE": "/c", "HOME": "/root", "HF_TOKEN": "x"}) == {"SVDBATCH_CACHE": "/c"}


def test_ray_settings_are_checked_up_front(tmp_path, manifest):
    cfg = make_cfg(
        f"manifest={manifest}", f"run.dir={tmp_path}", *RAY_RUN, "run.ray.object_store_mb=10", "run.ray.start_timeout_s=0"
    )
    with pytest.raises(ConfigError) as error:
        load_manifest(cfg)
    assert "run.ray.object_store_mb" in str(error.value) and "run.ray.start_timeout_s" in str(error.value)


def test_an_address_nobody_listens_on_is_a_clear_error_at_once(tmp_path, manifest):
    proc = cli([f"manifest={manifest}", *SETTINGS, *RAY_RUN, "run.ray.address=127.0.0.1:1", f"hydra.run.dir={tmp_path}"])
    out, err = proc.communicate(timeout=300)  # Ray itself would retry for minutes
    assert proc.returncode == EXIT_BAD_INPUT, err[-3000:]
    assert "no Ray cluster answers at 127.0.0.1:1" in err and "run.ray.address" in err


def test_without_ray_installed_the_ray_engine_says_what_to_install(tmp_path, manifest, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "svdbatch\[ray\]"'):
        load_manifest(make_cfg(f"manifest={manifest}", f"run.dir={tmp_path}", *RAY_RUN))
    load_manifest(make_cfg(f"manifest={manifest}", f"run.dir={tmp_path}"))  # the local engine does not need it


# -- on the cluster -------------------------------------------------------------------------
def test_a_sigkilled_actor_loses_and_duplicates_nothing(tmp_path, ray_address, manifest, reference):
    """The README's command with run.engine=ray, joining the cluster by address."""
    run_dir = tmp_path / "run"
    proc = cli([f"manifest={manifest}", *SETTINGS, *RAY_RUN, f"run.ray.address={ray_address}", f"hydra.run.dir={run_dir}"])
    wait_for_results(run_dir, 2, proc)
    actors = actor_processes(os.getpid())
    assert len(actors) == 2, [a.cmdline() for a in actors]
    os.kill(actors[0].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_ITEMS_FAILED, err[-3000:]  # only the unreachable URL failed
    assert "8 done" in out and "1 failed" in out
    assert "died" in err
    assert result_ids(run_dir) == GOOD  # each exactly once
    assert frame_hashes(run_dir) == reference
    assert "SvdbatchWorker" in err  # the actors' own log lines reach the driver


def test_ctrl_c_stops_every_actor_and_a_rerun_finishes_like_a_local_run(tmp_path, ray_address, manifest, reference):
    run_dir = tmp_path / "run"
    proc = cli([f"manifest={manifest}", *SETTINGS, *RAY_RUN, f"run.ray.address={ray_address}", f"hydra.run.dir={run_dir}"])
    wait_for_results(run_dir, 1, proc)
    # Both actors run (the second may still be starting on a busy machine when the first commits).
    assert wait_until(lambda: len(actor_processes(os.getpid())) == 2, timeout=60), actor_processes(os.getpid())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "8 done" not in out
    assert wait_until(lambda: not actor_processes(os.getpid())), "actor processes outlived the driver"
    assert wait_until(lambda: not svdbatch_actors_in_cluster()), svdbatch_actors_in_cluster()

    # The same run again (here in-process, on this process's connection) finishes the rest.
    summary = run(make_cfg(f"manifest={manifest}", *SETTINGS, *RAY_RUN, f"run.dir={run_dir}", fast=False))
    assert summary.skipped >= 1 and (summary.done + summary.skipped, summary.failed) == (8, 1)
    assert exit_code(summary) == EXIT_ITEMS_FAILED  # as a local run with a failed item
    assert frame_hashes(run_dir) == reference
    assert result_ids(run_dir) == GOOD  # each item exactly once
    assert {f["id"] for f in failures_of(run_dir)} == {"unreachable"}
    sidecar = json.loads((sidecar_file(run_dir, "i0")).read_text())
    assert sidecar["num_threads"] == 1 and sidecar["config"]["run"]["engine"] == "ray"
    # Dataset index, gallery and status read the run dir as for a local run.
    metadata = [json.loads(line)["file_name"] for line in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert sorted(metadata) == sorted(video_rel(run_dir, f"i{n}") for n in range(8))
    assert all(f"i{n}" in (run_dir / "index.html").read_text() for n in range(8))
    status = subprocess.run(
        [sys.executable, "-m", "svdbatch", "status", str(run_dir), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    counts = json.loads(status.stdout)["counts"]
    assert (counts["done"], counts["failed"], counts["pending"]) == (8, 1, 0)
    assert svdbatch_actors_in_cluster() == []  # the run's actors are gone with it
    assert not list(run_dir.glob(".node-probe*"))  # the storage probes are cleaned up


def test_sigterm_shuts_down_the_cluster_the_driver_started(tmp_path, ray_address, manifest):
    """Without a cluster to join ("local"), the driver starts one; SIGTERM (a scheduler's
    stop) leaves no process of it behind, and the exit status is 143 as for a killed run."""
    run_dir = tmp_path / "run"
    proc = cli(
        [
            f"manifest={manifest}",
            *SETTINGS,
            *RAY_RUN,
            "run.ray.address=local",
            "run.ray.num_cpus=2",
            "run.ray.object_store_mb=100",
            "run.ray.include_dashboard=false",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert wait_until(lambda: proc.poll() is not None or len(actor_processes(proc.pid)) == 2, timeout=300)
    started = psutil.Process(proc.pid).children(recursive=True)  # gcs, raylet, actors, ...
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert wait_until(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]), [
        p.cmdline() for p in started if p.is_running()
    ]


def test_a_run_dir_that_a_node_does_not_see_is_refused(tmp_path, ray_address, manifest):
    """Same path, other contents, as on a node with a local disk: /proc/self/cwd is the
    driver's folder in the driver and another folder in the actors (the cluster's cwd)."""
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    proc = cli(
        [
            f"manifest={manifest}",
            *SETTINGS,
            *RAY_RUN,
            f"run.ray.address={ray_address}",
            "run.dir=/proc/self/cwd/not-shared",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=driver_cwd,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_BAD_INPUT, err[-3000:]
    assert "is not shared with every Ray node" in err
    node_ip = ray.util.get_node_ip_address()
    assert f"svdbatch-worker-0 on node {node_ip}" in err and "shared file system" in err and "ReadWriteMany" in err
    assert "Traceback" not in err
    run_dir = driver_cwd / "not-shared"
    assert not results_of(run_dir)  # nothing generated
    assert not list(run_dir.glob(".node-probe*"))
    assert wait_until(lambda: not svdbatch_actors_in_cluster())


def test_batch_task_names_say_which_item():
    class Entry:
        def __init__(self, item_id):
            self.item = type("Item", (), {"id": item_id})

    assert batch_task_name([Entry("cat")]) == "item cat"
    assert batch_task_name([Entry("cat"), Entry("dog"), Entry("owl")]) == "items cat (+2)"
    assert ACTOR_NAME.format(3) == "svdbatch-worker-3"
