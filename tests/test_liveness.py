"""`svdbatch status` says a run is live only while a process of it exists: a real run,
SIGKILLed mid-way, is reported not live and without an ETA; other hosts' runs are 'unknown'."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from svdbatch.core.atomic import HOST, TEMP_MARKER, process_alive, temp_owner, temp_prefix, written_by_dead_process
from svdbatch.reports.status import collect, format_report
from svdbatch.rundir.claims import process_start_ticks
from svdbatch.rundir.owners import OWNERS_DIR, Owner, owner_state, read_owners
from tests.conftest import FAST, REPO, make_image, run_cli, write_csv

from .runfiles import results_of


def test_a_killed_run_is_not_live_and_has_no_eta(tmp_path):
    for n in range(10):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/{n}.png", n] for n in range(10)])
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "svdbatch",
            f"manifest={manifest}",
            f"hydra.run.dir={run_dir}",
            *FAST,
            "conditioning.num_inference_steps=4",
            "run.num_threads=1",
            "run.progress=false",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(results_of(run_dir)) < 1:
            assert proc.poll() is None, "the run ended before finishing an item"
            time.sleep(0.05)
        alive = collect(run_dir)
        assert proc.poll() is None, "the run must still be going for this check"
        assert alive["live"] is True
        assert [(o["pid"], o["state"]) for o in alive["owners"]] == [(proc.pid, "running")]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= len(results_of(run_dir)) < 10, "the kill should land mid-run"

    status = run_cli("status", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["live"] is False and report["eta_s"] is None
    assert report["owners"][0]["state"] == "dead"  # its owner file is left behind, its pid is gone
    assert report["throughput"]["items_per_hour"]  # recent finishes alone do not make it live
    text = run_cli("status", str(run_dir))
    assert "live         no" in text.stdout and "no run is active" in text.stdout

    # A run on another host (shared file system): its pid means nothing here; unknown while
    # its heartbeat is fresh, with the heartbeat's age, and gone after missed heartbeats.
    (run_dir / OWNERS_DIR / "1@elsewhere.json").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    recent = time.time() - 60
    os.utime(run_dir / OWNERS_DIR / "1@elsewhere.json", (recent, recent))
    report = collect(run_dir)
    assert report["live"] is None and report["eta_s"] is not None  # a fresh heartbeat: the ETA holds
    assert "unknown (runs on elsewhere; last heartbeat 1 min 00 s ago)" in format_report(report)
    stale = time.time() - 3600
    os.utime(run_dir / OWNERS_DIR / "1@elsewhere.json", (stale, stale))
    report = collect(run_dir)
    assert report["live"] is False and report["eta_s"] is None  # an hour without a heartbeat: gone
    assert {o["host"]: o["state"] for o in report["owners"]}["elsewhere"] == "dead"

    # The next run clears both (dead pid; heartbeat older than 10 min) and removes its own on exit.
    resumed = run_cli(
        f"manifest={manifest}",
        f"hydra.run.dir={run_dir}",
        *FAST,
        "conditioning.num_inference_steps=4",
        "run.num_threads=1",
        "run.progress=false",
        "run.limit=1",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert read_owners(run_dir) == []


def test_owner_state_of_a_reused_pid_and_the_heartbeat(tmp_path):
    with Owner(tmp_path, heartbeat_s=0.05) as owner:
        [record] = read_owners(tmp_path)
        assert record["pid"] == os.getpid() and owner_state(record) == "running"
        first = os.stat(owner.path).st_mtime_ns
        deadline = time.time() + 30
        while os.stat(owner.path).st_mtime_ns == first and time.time() < deadline:
            time.sleep(0.05)
        assert os.stat(owner.path).st_mtime_ns > first  # the heartbeat touches it
    assert read_owners(tmp_path) == []  # removed on exit
    if process_start_ticks(os.getpid()) is not None:
        reused = {"pid": os.getpid(), "host": HOST, "process_start": process_start_ticks(os.getpid()) + 1}
        assert owner_state(reused) == "dead"  # same pid, another process


def wait_for_state(pid: int, state: str) -> None:
    """Poll /proc until the process is in `state` (Z: exited, not yet reaped)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == state:
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {state}")


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to see a zombie")


@needs_proc
def test_process_alive_of_a_running_a_zombie_and_a_reaped_child():
    assert process_alive(os.getpid())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_alive(child.pid)
        child.kill()
        wait_for_state(child.pid, "Z")
        os.kill(child.pid, 0)  # the precondition: a zombie still has its pid
        assert not process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


@needs_proc
def test_a_zombies_temporary_and_owner_file_are_a_dead_processs():
    child = subprocess.Popen(["sleep", "30"])
    temporary = f".clip{TEMP_MARKER}{child.pid}@{HOST}@x1y2"  # as temp_prefix names the child's
    try:
        assert temp_owner(temporary) == (child.pid, HOST)
        owner = {"pid": child.pid, "host": HOST, "process_start": process_start_ticks(child.pid)}
        assert not written_by_dead_process(temporary) and owner_state(owner) == "running"
        child.kill()
        wait_for_state(child.pid, "Z")  # not reaped: kill(pid, 0) still succeeds
        assert written_by_dead_process(temporary)
        assert owner_state(owner) == "dead"
    finally:
        child.kill()
        child.wait()
    assert written_by_dead_process(temporary)
    assert not written_by_dead_process(temp_prefix("clip") + "x1y2")  # this live process's own
