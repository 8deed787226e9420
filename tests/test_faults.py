"""Faults: SIGKILL at every stage of an item, a full disk, out-of-memory, NaN frames, an
unusable run dir. Each checks what a user relies on: nothing half-written is ever taken
as done, nothing done is lost, and a re-run ends exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from svdbatch import run
from svdbatch.core.atomic import TEMP_MARKER
from svdbatch.engine.pool import MAX_RESTARTS_IN_A_ROW
from svdbatch.engine.reproduce import reproduce

from .conftest import FAST, REPO, make_cfg, make_image, write_csv
from .runfiles import failures_of, results_of, sidecar_file, video_file

THREADS = "run.num_threads=1"  # the same in every run compared here


@pytest.fixture(scope="module")
def manifest3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    for n in range(3):
        make_image(root / "img" / f"i{n}.png", seed=n)
    return write_csv(root / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/i{n}.png", n] for n in range(3)])


@pytest.fixture(scope="module")
def clean_run(manifest3, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    assert run(make_cfg(f"manifest={manifest3}", THREADS, f"run.dir={run_dir}")).done == 3
    return run_dir


def run_with_fault(manifest: Path, run_dir: Path, fault: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("SVDBATCH_FAULT", None)
    if fault:
        env["SVDBATCH_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "svdbatch", f"manifest={manifest}", *FAST, THREADS, f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def results_ids(run_dir: Path) -> Counter:
    return Counter(r["id"] for r in results_of(run_dir))


def leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if TEMP_MARKER in p.name]


def outputs_of(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "videos").glob("*/*"))}


def frame_hashes(run_dir: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["frames_sha256"] for p in (run_dir / "items").glob("*/*.json")}


@pytest.mark.parametrize("stage", ["generate", "video", "sidecar", "results"])
def test_sigkill_at_any_stage_then_resume_gives_the_uninterrupted_result(tmp_path, manifest3, clean_run, stage):
    run_dir = tmp_path / "run"
    killed = run_with_fault(manifest3, run_dir, f"{stage}:2:killrun")  # driver and worker: a power loss
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if stage in ("video", "sidecar"):
        assert leftovers(run_dir), "the kill should have left a temporary behind"
    if stage == "results":  # item 2's sidecar is in place, its results line is not
        assert (sidecar_file(run_dir, "i1")).exists() and results_ids(run_dir)["i1"] == 0

    resumed = run_with_fault(manifest3, run_dir, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert results_ids(run_dir) == Counter({"i0": 1, "i1": 1, "i2": 1})  # each done exactly once
    assert not leftovers(run_dir)  # the dead run's temporaries are cleaned up at once
    assert outputs_of(run_dir) == outputs_of(clean_run)  # byte-identical videos
    assert frame_hashes(run_dir) == frame_hashes(clean_run)


def test_a_worker_killed_mid_run_is_replaced_and_every_item_is_done(tmp_path, manifest3, clean_run):
    """The default command's worker is a process of its own: a segfault or the OOM killer
    takes that process, not the run. Killed at its third item, it is restarted and the
    batches it held are redone: the result is the uninterrupted one."""
    run_dir = tmp_path / "run"
    result = run_with_fault(manifest3, run_dir, "generate:3:kill")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "worker 0 died (exit code -9)" in result.stderr and "restarting worker 0" in result.stderr
    assert "3 done, 0 skipped, 0 failed" in result.stdout
    assert results_ids(run_dir) == Counter({"i0": 1, "i1": 1, "i2": 1})
    assert not leftovers(run_dir)
    assert outputs_of(run_dir) == outputs_of(clean_run)
    assert frame_hashes(run_dir) == frame_hashes(clean_run)


def test_a_worker_that_dies_on_every_item_fails_them_and_the_run_ends(tmp_path, manifest3):
    """Restarts stop after MAX_RESTARTS_IN_A_ROW deaths with nothing done in between (here
    every new worker dies at its first item): the items it was given fail after two tries,
    the rest fail as left with no worker, each recorded with its reason; a re-run without
    the fault does them all."""
    ids = [f"i{n}" for n in range(5)]
    manifest = write_csv(
        tmp_path / "m5.csv",
        ["id", "image", "seed"],
        [[item_id, str(manifest3.parent / "img" / f"i{n % 3}.png"), n] for n, item_id in enumerate(ids)],
    )
    run_dir = tmp_path / "run"
    result = run_with_fault(manifest, run_dir, "generate:1:kill")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "0 done, 0 skipped, 5 failed" in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.count("restarting worker 0") == MAX_RESTARTS_IN_A_ROW
    assert f"{MAX_RESTARTS_IN_A_ROW + 1} workers died in a row without finishing a batch" in result.stderr
    failures = failures_of(run_dir)
    assert sorted(f["id"] for f in failures) == ids
    reasons = {f["error"] for f in failures}
    assert "worker 0 died (exit code -9), 2 attempts" in reasons
    assert any("no live worker left" in reason for reason in reasons)
    resumed = run_with_fault(manifest, run_dir, None)
    assert resumed.returncode == 0 and "5 done" in resumed.stdout, resumed.stderr[-2000:]


def test_disk_full_mid_run_stops_cleanly_and_resumes(tmp_path, manifest3, clean_run):
    run_dir = tmp_path / "run"
    stopped = run_with_fault(manifest3, run_dir, "video:2:enospc")
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert "STOPPED" in stopped.stdout and "No space left on device" in stopped.stdout
    assert "free space and run again" in stopped.stderr
    # i0 was finished before the disk "filled" and is intact; i1 hit it. (i2 may have been
    # generated already and written: the injected error happens once, a real full disk would not.)
    finished = results_ids(run_dir)
    assert finished["i0"] == 1 and finished["i1"] == 0
    assert not failures_of(run_dir)  # not the items' fault: nothing recorded as failed
    assert outputs_of(run_dir)["i0.mp4"] == outputs_of(clean_run)["i0.mp4"]

    resumed = run_with_fault(manifest3, run_dir, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{3 - len(finished)} done, {len(finished)} skipped" in resumed.stdout
    assert results_ids(run_dir) == Counter({"i0": 1, "i1": 1, "i2": 1})
    assert outputs_of(run_dir) == outputs_of(clean_run)


def test_disk_full_stops_a_multi_worker_run_too(tmp_path, manifest3):
    run_dir = tmp_path / "run"
    stopped = run_with_fault(manifest3, run_dir, "video:1:enospc", "run.workers=2")
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert "STOPPED" in stopped.stdout
    resumed = run_with_fault(manifest3, run_dir, None, "run.workers=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert results_ids(run_dir) == Counter({"i0": 1, "i1": 1, "i2": 1})  # each once: a duplicate fails


def test_unwritable_or_full_run_dir_fails_before_the_model_loads(tmp_path, manifest3):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_with_fault(manifest3, tmp_path / "hydra", None, f"run.dir={blocker / 'run'}")
    assert result.returncode == 2
    assert "is not writable" in result.stderr and "loaded" not in result.stderr

    result = run_with_fault(manifest3, tmp_path / "run", None, "run.min_free_mb=1000000000")
    assert result.returncode == 2
    assert "MB free, run.min_free_mb=1000000000" in result.stderr and "loaded" not in result.stderr


def test_out_of_memory_is_recorded_with_a_hint_and_the_batch_goes_on(tmp_path, manifest3, monkeypatch):
    monkeypatch.setenv("SVDBATCH_FAULT", "generate:1:oom")
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    summary = run(make_cfg(f"manifest={manifest3}", THREADS, f"run.dir={tmp_path / 'run'}"))
    assert (summary.done, summary.failed) == (2, 1)
    (failure,) = failures_of(tmp_path / "run")
    assert failure["id"] == "i0" and "OutOfMemoryError" in failure["error"] and "run.retry_on_oom=true" in failure["error"]
    assert "Traceback" in failure["traceback"]


def test_retry_on_oom_steps_down_the_memory_ladder_and_records_it(tmp_path, manifest3, monkeypatch):
    # Three simulated OOMs in a row on the first item: full -> balanced -> low -> smaller decode chunks.
    calls = Counter()
    real_generate = __import__("svdbatch.engine.worker", fromlist=["Worker"]).Worker.generate

    def generate(self, images, params, seeds):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(self, images, params, seeds)

    monkeypatch.setattr("svdbatch.engine.worker.Worker.generate", generate)
    # A fresh pipeline: lowering changes the loaded one in place, which other tests must not see.
    monkeypatch.setattr("svdbatch.models.loading._loaded", {})
    summary = run(
        make_cfg(
            f"manifest={manifest3}",
            THREADS,
            "run.retry_on_oom=true",
            "conditioning.decode_chunk_size=4",
            f"run.dir={tmp_path / 'run'}",
        )
    )
    assert (summary.done, summary.failed) == (3, 0)
    first = json.loads((sidecar_file(tmp_path / "run", "i0")).read_text())
    assert [step.split(" (")[0] for step in first["oom_fallback"]] == [
        "memory -> balanced",
        "memory -> low",
        "decode_chunk_size 2 -> 1",
    ]
    assert first["memory"]["preset"] == "low" and first["memory"]["forward_chunking"] is True
    assert first["params"]["decode_chunk_size"] == 1  # what was really used, so reproduce uses it too
    later = json.loads((sidecar_file(tmp_path / "run", "i2")).read_text())
    assert later["oom_fallback"] == [] and later["memory"]["decode_cap"] == 1  # the worker stays lowered
    # The sidecar alone (lowered params, forward chunking in effect) regenerates the same frames.
    assert reproduce(sidecar_file(tmp_path / "run", "i0")).matches


def test_nan_frames_fail_only_that_item_once_the_rescue_ladder_is_spent(tmp_path, manifest3, monkeypatch):
    """NaN at every step of the rescue ladder (models/rescue.py: as loaded, VAE decode in
    fp32, whole pipeline in fp32): the item fails with the hint, the others are done."""
    from diffusers import StableVideoDiffusionPipeline

    real_decode = StableVideoDiffusionPipeline.decode_latents
    calls = Counter()

    def decode_latents(self, *args, **kwargs):
        calls["n"] += 1
        frames = real_decode(self, *args, **kwargs)
        return frames * float("nan") if calls["n"] in (2, 3, 4) else frames

    monkeypatch.setattr(StableVideoDiffusionPipeline, "decode_latents", decode_latents)
    summary = run(make_cfg(f"manifest={manifest3}", THREADS, f"run.dir={tmp_path / 'run'}"))
    assert (summary.done, summary.failed) == (2, 1)
    (failure,) = failures_of(tmp_path / "run")
    assert failure["id"] == "i1" and "NaN" in failure["error"] and "model.dtype=float32" in failure["error"]
    assert calls["n"] == 5  # i1 three times
    assert not (video_file(tmp_path / "run", "i1", ".mp4")).exists()


def test_temporaries_of_the_longest_ids_fit_a_file_name(tmp_path):
    from svdbatch.core.atomic import atomic_write_bytes, temp_owner, temp_prefix

    long_id = "é" * 100  # 200 bytes: the longest id the manifest accepts
    assert len(temp_prefix(long_id).encode()) <= 1 + 60 + len(TEMP_MARKER) + 7 + 1 + 64 + 1  # whatever the host name
    assert temp_owner(temp_prefix(long_id) + "abc123.json") == (os.getpid(), temp_owner(temp_prefix("x") + "q")[1])
    atomic_write_bytes(tmp_path / f"{long_id}.json", b"{}")
    assert (tmp_path / f"{long_id}.json").read_bytes() == b"{}"


# -- a full disk inside the encoder, and at the very end ---------------------------------
@pytest.fixture
def manifest1(tmp_path) -> Path:
    make_image(tmp_path / "img" / "i0.png", seed=0)
    return write_csv(tmp_path / "m1.csv", ["id", "image", "seed"], [["i0", "img/i0.png", 0]])


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (needs root / CAP_SYS_ADMIN; skipped where mounting is impossible)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the injected-ENOSPC tests cover the logic")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_leaving(mount: Path, free_bytes: int) -> Path:
    stat = os.statvfs(mount)
    filler = mount / "filler"
    filler.write_bytes(b"x" * (stat.f_bavail * stat.f_frsize - free_bytes))
    return filler


def test_ffmpeg_running_out_of_space_stops_the_run_and_commits_nothing(tmp_path, manifest1, small_disk):
    # The user's case: a few KB left, ffmpeg fails writing the mp4 trailer. It used to be
    # committed as done (4096-byte file that does not decode) with exit 0.
    run_dir = small_disk / "run"
    run_dir.mkdir()
    big = ["conditioning.width=128", "conditioning.height=128", "run.min_free_mb=0", "run.gallery=false", f"run.dir={run_dir}"]
    # A run that generates nothing lays out the run dir (logs, caches, claims), so what is left
    # below is what the item's own files get, not the bookkeeping's.
    assert run_with_fault(manifest1, tmp_path / "hydra", None, *big, "run.limit=0").returncode == 0
    filler = fill_leaving(small_disk, 4 * 4096)  # the owner file, cache lines, a claim: < one 128x128 mp4
    stopped = run_with_fault(manifest1, tmp_path / "hydra", None, *big)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr[-2000:]
    assert "0 done" in stopped.stdout and "STOPPED" in stopped.stdout and "No space left on device" in stopped.stdout
    assert "ffmpeg writing" in stopped.stdout  # the encoder's own failure, not a later write
    assert not [p for p in (run_dir / "videos").rglob("*") if p.is_file()] and not list((run_dir / "items").rglob("*.json"))
    assert not results_of(run_dir) and not failures_of(run_dir)

    filler.unlink()  # space freed: the same command finishes the item
    resumed = run_with_fault(manifest1, tmp_path / "hydra", None, *big)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 done, 0 skipped" in resumed.stdout
    from svdbatch.rundir.outputs import read_video

    assert read_video(video_file(run_dir, "i0", ".mp4")).shape == (4, 128, 128, 3)


def test_injected_enospc_in_the_encoder_stops_with_exit_3(tmp_path, manifest1, monkeypatch):
    from svdbatch.cli import exit_code

    monkeypatch.setenv("SVDBATCH_FAULT", "encode:1:enospc")
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    run_dir = tmp_path / "run"
    summary = run(make_cfg(f"manifest={manifest1}", THREADS, f"run.dir={run_dir}"))
    assert exit_code(summary) == 3 and (summary.done, summary.not_run) == (0, 1)
    assert "STOPPED (OSError: [Errno 28] No space left on device (injected at encode))" in summary.line()
    assert not leftovers(run_dir) and not results_of(run_dir)
    assert not [p for p in (run_dir / "videos").rglob("*") if p.is_file()]


def test_disk_full_writing_metadata_at_the_end_stops_with_exit_3_and_the_summary(tmp_path, manifest1, monkeypatch):
    from svdbatch.cli import exit_code

    monkeypatch.setenv("SVDBATCH_FAULT", "metadata:1:enospc")
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest1}", THREADS, f"run.dir={run_dir}")
    summary = run(cfg)  # used to be a traceback and exit 1
    assert exit_code(summary) == 3
    assert summary.line().startswith("svdbatch: 1 done, 0 skipped, 0 failed, 0 not run: STOPPED (OSError: [Errno 28]")
    assert not (run_dir / "metadata.jsonl").exists() and not leftovers(run_dir)
    monkeypatch.delenv("SVDBATCH_FAULT")
    again = run(cfg)
    assert exit_code(again) == 0 and again.skipped == 1
    assert json.loads((run_dir / "metadata.jsonl").read_text())["id"] == "i0"
