"""Stopping a run with real signals: Ctrl-C to the process group, SIGTERM to the driver
(Kubernetes, Slurm), SIGKILL of the driver, SIGUSR2 under Hydra's submitit launcher
(preemption: requeue), and file permissions under a given umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from svdbatch.core.atomic import TEMP_MARKER
from svdbatch.core.errors import exit_code_for_signal
from tests.conftest import FAST, REPO, make_image, write_csv

from .runfiles import results_of, sidecar_file, video_file

N_ITEMS = 6
WAIT_S = 300  # generous: the test machine is shared


@pytest.fixture
def manifest(tmp_path) -> Path:
    for n in range(N_ITEMS):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    return write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/{n}.png", n] for n in range(N_ITEMS)])


def command(manifest: Path, run_dir: Path, *extra: str, steps: int = 3) -> list[str]:
    return [
        sys.executable,
        "-m",
        "svdbatch",
        f"manifest={manifest}",
        f"hydra.run.dir={run_dir}",
        *FAST,
        f"conditioning.num_inference_steps={steps}",
        "run.progress=false",
        *extra,
    ]


def start(args: list[str], cwd: Path = REPO) -> subprocess.Popen:
    """In its own process group, as a shell job would be: Ctrl-C reaches the whole group."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def wait_for_results(run_dir: Path, proc: subprocess.Popen, lines: int = 1) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(results_of(run_dir)) < lines:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never committed an item"
        time.sleep(0.05)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def assert_all_gone(procs: list[psutil.Process], within_s: float = 15) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within_s)
    assert not alive, f"outlived the driver: {[(p.pid, p.cmdline()[-1:]) for p in alive]}"


def assert_nothing_half_committed(run_dir: Path) -> list[str]:
    """Every results line has its sidecar and video; no temporary is left anywhere."""
    ids = [record["id"] for record in results_of(run_dir)]
    for item_id in ids:
        assert (sidecar_file(run_dir, f"{item_id}")).is_file()
        assert video_file(run_dir, item_id).stat().st_size > 0
    leftovers = [p for p in run_dir.rglob("*") if TEMP_MARKER in p.name]
    assert not leftovers, leftovers
    return ids


def assert_resumes_exactly_once(args: list[str], run_dir: Path, done_before: int) -> None:
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stderr
    assert f"{N_ITEMS - done_before} done, {done_before} skipped, 0 failed" in again.stdout
    ids = assert_nothing_half_committed(run_dir)
    assert sorted(ids) == sorted(f"i{n}" for n in range(N_ITEMS))  # each item exactly once


def assert_stopped_cleanly(proc: subprocess.Popen, run_dir: Path, code: int) -> tuple[str, int]:
    """The stopped run exited with `code`, no traceback, nothing half-committed, and said
    how far it got in one line. Returns its stderr and the number of items done."""
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    done = len(assert_nothing_half_committed(run_dir))
    assert out.strip() == f"interrupted: {done} done, {N_ITEMS - done} left; run the same command to resume"
    return err, done


def test_ctrl_c_to_the_group_stops_two_workers_cleanly_and_the_same_command_resumes(tmp_path, manifest):
    run_dir = tmp_path / "run"
    # Each worker holds two items (one generating, one loaded next) and the driver sees a
    # signal within a quarter second: items must take long enough that the signal, sent
    # after the first commit, still leaves work that has not started.
    args = command(manifest, run_dir, "run.workers=2", "run.stop_grace_s=600", steps=16)
    proc = start(args)
    wait_for_results(run_dir, proc)
    workers = descendants(proc.pid)
    assert len([p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]) == 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C

    assert exit_code_for_signal(signal.SIGINT) == 130
    err, done = assert_stopped_cleanly(proc, run_dir, 130)
    assert "KeyboardInterrupt" not in err and "leaked" not in err
    assert done < N_ITEMS, "the signal should land mid-run"
    assert_all_gone(workers)
    assert_resumes_exactly_once(args, run_dir, done)


def test_sigterm_to_the_driver_past_the_grace_abandons_the_items_in_flight(tmp_path, manifest):
    """Kubernetes signals only the driver. With no grace the workers are killed at once:
    their items in flight are abandoned, never half-committed, and redone by the next run."""
    run_dir = tmp_path / "run"
    args = command(manifest, run_dir, "run.workers=2", "run.stop_grace_s=0", steps=16)  # see the Ctrl-C test
    proc = start(args)
    wait_for_results(run_dir, proc)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)

    _, done = assert_stopped_cleanly(proc, run_dir, 143)
    assert_all_gone(workers)
    assert_resumes_exactly_once(args, run_dir, done)


def test_sigterm_in_process_worker_finishes_the_item_in_flight(tmp_path, manifest):
    """run.workers=1 generates in the driver itself: the item in flight finishes and commits."""
    run_dir = tmp_path / "run"
    args = command(manifest, run_dir, "run.stop_grace_s=600")
    proc = start(args)
    wait_for_results(run_dir, proc)
    proc.send_signal(signal.SIGTERM)

    _, done = assert_stopped_cleanly(proc, run_dir, 143)
    assert done >= 2, "the item generating when the signal came should have been finished"


def test_workers_die_when_the_driver_is_sigkilled(tmp_path, manifest):
    run_dir = tmp_path / "run"
    proc = start(command(manifest, run_dir, "run.workers=2"))
    wait_for_results(run_dir, proc)
    workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    everything = descendants(proc.pid)
    proc.kill()
    proc.communicate()
    assert_all_gone(everything, within_s=10)  # PR_SET_PDEATHSIG: at once; the watch thread: within a second


def test_sigusr2_under_submitit_stops_cleanly_requeues_and_the_requeued_job_finishes(tmp_path, manifest):
    """submitit's preemption signal: the job stops cleanly, then submitit's own handler
    checkpoints and requeues it (submitit_local restarts it at once); the requeued job
    resumes the run, so the launcher ends with every item done exactly once."""
    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "svdbatch",
        "-m",
        "hydra/launcher=submitit_local",
        f"manifest={manifest}",
        f"hydra.sweep.dir={sweep}",
        *FAST,
        "conditioning.num_inference_steps=16",
        "run.progress=false",
    ]
    proc = start(args)
    deadline = time.monotonic() + WAIT_S
    while not [p for p in sweep.glob("*/layout.json") if results_of(p.parent)]:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    jobs = [p for p in descendants(proc.pid) if "submitit.core._submit" in " ".join(p.cmdline())]
    assert len(jobs) == 1
    jobs[0].send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err

    (run_dir,) = [p.parent for p in sweep.glob("*/layout.json")]
    log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "interrupted: " in log and "left; run the same command to resume" in log
    assert "Requeued job" in log
    assert "Traceback" not in log
    ids = assert_nothing_half_committed(run_dir)
    assert sorted(ids) == sorted(f"i{n}" for n in range(N_ITEMS))  # each item exactly once


@pytest.mark.parametrize("umask, file_mode, dir_mode, output", [(0o022, 0o644, 0o755, "mp4"), (0o077, 0o600, 0o700, "frames")])
def test_written_files_follow_the_umask(tmp_path, manifest, umask, file_mode, dir_mode, output):
    """Not mkstemp's 0600: colleagues and a web server serving the gallery must read the run dir."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        command(manifest, run_dir, "run.limit=1", f"output={output}", "output.webdataset=true"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    video = video_file(run_dir, "i0", ".mp4" if output == "mp4" else "")
    files = [
        sidecar_file(run_dir, "i0"),
        *run_dir.glob("records/*.results.jsonl"),
        run_dir / "metadata.jsonl",
        run_dir / "index.html",
        run_dir / "config.yaml",
        *run_dir.glob("webdataset/*"),
        *(p for p in (run_dir / "gallery").rglob("*") if p.is_file()),
    ]
    files += [video] if output == "mp4" else list(video.iterdir())
    assert len(files) >= 7
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    folders = [run_dir, run_dir / "videos", run_dir / "items", video.parent, run_dir / "records"]
    folders += [video] if output == "frames" else []
    for path in folders:
        assert stat.S_IMODE(path.stat().st_mode) == dir_mode, path
