"""A run dir that turns read-only, or vanishes, in the middle of a run: the run stops with
the documented code (3), prints its summary line and no traceback, and (read-only) the same
command resumes once the dir is writable again, every item done exactly once."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from svdbatch import run
from svdbatch.cli import exit_code
from svdbatch.core.errors import EXIT_STOPPED
from tests.conftest import make_cfg, make_image, write_csv
from tests.test_signals import WAIT_S, command, start, wait_for_results

from .runfiles import results_of

N_ITEMS = 8


@pytest.fixture
def manifest(tmp_path) -> Path:
    for n in range(N_ITEMS):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    return write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/{n}.png", n] for n in range(N_ITEMS)])


@pytest.fixture
def read_only_later(tmp_path):
    """Makes a folder read-only while a run has files open in it: a read-only bind mount of
    the folder is laid over it (new opens go through it; remounting the folder's own mount
    read-only fails while files are open for writing). Made read-only in a staging place
    first, then moved over the folder in one step, so no file of the run gets opened for
    writing on it meanwhile. Needs root (CAP_SYS_ADMIN) and a private mount propagation."""
    mounted: list[Path] = []
    staging = tmp_path / "staging"
    staging.mkdir()

    def mount(*args: str) -> bool:
        return subprocess.run(["mount", *args], capture_output=True).returncode == 0

    def make_read_only(folder: Path) -> None:
        if not mount("--bind", str(folder), str(staging)):
            pytest.skip("cannot bind-mount here (not root)")
        if not (mount("-o", "remount,ro,bind", str(staging)) and mount("--move", str(staging), str(folder))):
            subprocess.run(["umount", "-l", str(staging)], check=False)
            pytest.skip("cannot lay a read-only bind mount over a folder here")
        mounted.append(folder)

    yield make_read_only
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def vanish(folder: Path) -> None:
    """Deleted at once (renamed away, then removed), as a user's `rm -rf` looks once done."""
    trash = folder.with_name(folder.name + ".deleted")
    folder.rename(trash)
    shutil.rmtree(trash)


def assert_stopped_with_summary(proc: subprocess.Popen, why: str) -> str:
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == EXIT_STOPPED, out + err[-3000:]
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    (line,) = out.strip().splitlines()
    assert line.startswith("svdbatch: ") and "not run: STOPPED (" in line and why in line, line
    return line


def test_a_run_dir_turning_read_only_mid_run_stops_with_exit_3_and_resumes(tmp_path, manifest, read_only_later):
    run_dir = tmp_path / "run"
    args = command(manifest, run_dir, steps=6)
    proc = start(args)
    wait_for_results(run_dir, proc)
    read_only_later(run_dir)
    assert_stopped_with_summary(proc, "Read-only file system")

    subprocess.run(["umount", "-l", str(run_dir)], check=True)
    again = subprocess.run(args, capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = Counter(record["id"] for record in results_of(run_dir))
    assert sorted(ids) == [f"i{n}" for n in range(N_ITEMS)] and set(ids.values()) == {1}  # each exactly once


def test_a_run_dir_deleted_mid_run_stops_with_exit_3_and_is_not_recreated(tmp_path, manifest):
    run_dir = tmp_path / "run"
    proc = start(command(manifest, run_dir, steps=6))
    wait_for_results(run_dir, proc)
    started = time.monotonic()
    vanish(run_dir)
    assert_stopped_with_summary(proc, f"run dir {run_dir} vanished")
    assert time.monotonic() - started < 60  # not a worker restarted again and again
    assert not run_dir.exists()


def test_a_python_callers_run_whose_dir_is_deleted_stops_too(tmp_path, manifest):
    """A Python caller's run (the worker in its own process): the same stop."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "conditioning.num_inference_steps=6", "run.progress=false")

    def delete_after_first_commit() -> None:
        deadline = time.monotonic() + WAIT_S
        while not results_of(run_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        vanish(run_dir)

    deleter = threading.Thread(target=delete_after_first_commit)
    deleter.start()
    summary = run(cfg)
    deleter.join()
    assert exit_code(summary) == EXIT_STOPPED, summary.line()
    assert summary.done >= 1 and summary.failed == 0 and summary.not_run >= 1
    assert f"run dir {run_dir} vanished" in summary.line()
    assert not run_dir.exists()
