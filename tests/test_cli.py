"""The command line as users run it: the Hydra app, multirun sweeps, exit codes, a real kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svdbatch.cli import SUBCOMMANDS
from svdbatch.core.errors import EXIT_BAD_INPUT
from svdbatch.rundir.outputs import read_video
from tests.conftest import FAST, REPO, SAMPLE_CSV, make_image, run_cli, write_csv

from .runfiles import results_of, sidecar_file, video_file


def test_readme_command_runs_the_sample_manifest(tmp_path):
    """`svdbatch manifest=manifests/sample.csv` with the default (tiny) config, via the console script."""
    script = Path(sys.executable).with_name("svdbatch")
    assert script.exists(), "console script not installed"
    proc = subprocess.run(
        [str(script), "manifest=manifests/sample.csv", f"hydra.run.dir={tmp_path / 'sample'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 done, 0 skipped, 0 failed" in proc.stdout
    run_dir = tmp_path / "sample"
    for item_id in ("sunset", "rocket", "waves"):
        frames = read_video(video_file(run_dir, item_id))
        assert frames.shape == (8, 64, 96, 3)  # conditioning=tiny: 8 frames of 96x64
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config.yaml").is_file()


def test_default_run_dir_is_stable_and_named_after_the_manifest(tmp_path):
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    proc = run_cli("manifest=manifests/sample.jsonl", "run.limit=1", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert results_of(tmp_path / "outputs" / "sample")
    again = run_cli("manifest=manifests/sample.jsonl", "run.limit=1", *FAST, cwd=tmp_path)
    assert "0 done, 1 skipped" in again.stdout


def test_multirun_gives_each_sweep_point_its_own_resumable_dir(tmp_path):
    args = ["-m", "conditioning.motion_bucket_id=60,180", f"manifest={SAMPLE_CSV}", f"hydra.sweep.dir={tmp_path}", *FAST]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert dirs == sorted(",".join(sorted([f"conditioning.motion_bucket_id={m}", *FAST])) for m in (60, 180))
    hashes = []
    for name in dirs:
        records = results_of(tmp_path / name)
        assert len(records) == 3
        hashes.append({r["id"]: r["frames_sha256"] for r in records})
    assert hashes[0]["sunset"] != hashes[1]["sunset"]  # motion_bucket_id reached the model
    # rocket and waves set motion_bucket_id in their rows: the same item at both points, linked once made.
    assert proc.stdout.count("3 done") == 1 and proc.stdout.count("1 done, 2 reused") == 1
    assert hashes[0]["rocket"] == hashes[1]["rocket"] and hashes[0]["waves"] == hashes[1]["waves"]
    assert proc.stderr.count("loaded tiny") == 1  # the second sweep point reused the pipeline
    again = run_cli(*args)
    assert again.stdout.count("0 done, 3 skipped") == 2


def test_config_typo_fails_at_start_up():
    proc = run_cli(f"manifest={SAMPLE_CSV}", "conditioning.motion_bucket=60")
    assert proc.returncode == EXIT_BAD_INPUT
    assert "Could not override 'conditioning.motion_bucket'" in proc.stderr
    assert "Key 'motion_bucket' not in 'ConditioningConfig'" in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["conditioning.width=wide"], "Value 'wide' of type 'str' could not be converted to Integer"),
        (["memory=huge"], "Could not find 'memory/huge'"),
        (["model=nope"], "Could not find 'model/nope'"),
        (["run.no_such_key=1"], "Key 'no_such_key' not in 'RunConfig'"),
        (["manifest=does/not/exist.csv"], "does/not/exist.csv: manifest file not found"),
    ],
)
def test_every_config_error_exits_2_with_one_message_and_no_traceback(tmp_path, overrides, message):
    """2 means bad input, nothing generated; 1 would mean that items failed."""
    proc = run_cli(f"manifest={SAMPLE_CSV}", *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 20


def test_missing_manifest_exits_2_with_the_usage():
    proc = run_cli("run.limit=1")
    assert proc.returncode == EXIT_BAD_INPUT
    assert "missing manifest=PATH" in proc.stderr and "subcommands:" in proc.stderr
    assert "Traceback" not in proc.stderr and "exception formatting" not in proc.stderr


def test_bare_svdbatch_prints_a_short_usage_with_the_subcommands_and_exits_2():
    proc = run_cli()
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.startswith("usage: svdbatch manifest=PATH")
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in proc.stderr
    assert len(proc.stderr.splitlines()) < 30 and "Traceback" not in proc.stderr


def test_help_lists_the_subcommands_then_hydras_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert all(f"\n  {name} " in proc.stdout for name in SUBCOMMANDS)
    assert "== Configuration groups ==" in proc.stdout and "model: svd, svd_xt" in proc.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name):
    proc = run_cli(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: svdbatch {name}") and "Traceback" not in proc.stderr


def test_out_of_range_config_value_is_a_clear_error(tmp_path):
    proc = run_cli(f"manifest={SAMPLE_CSV}", "conditioning.motion_bucket_id=300", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "conditioning.motion_bucket_id: must be an integer in [0, 255], got 300" in proc.stderr


def test_bad_manifest_exits_2_before_loading_anything(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "nope.png", "x"]])
    proc = run_cli(f"manifest={manifest}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"{manifest}:2: field 'seed'" in proc.stderr and f"{manifest}:2: field 'image'" in proc.stderr
    assert not (tmp_path / "run" / "videos").exists()


def test_failed_items_give_exit_code_1(tmp_path):
    make_image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["ok.png"], ["bad.png"]])
    proc = run_cli(f"manifest={manifest}", f"hydra.run.dir={tmp_path / 'run'}", "run.check_images=false", *FAST)
    assert proc.returncode == 1
    assert "1 done, 0 skipped, 1 failed" in proc.stdout


def test_validate_subcommand(tmp_path):
    proc = run_cli("validate", f"manifest={SAMPLE_CSV}")
    assert proc.returncode == 0 and "3 valid rows" in proc.stdout
    bad = write_csv(tmp_path / "m.csv", ["image", "width"], [["x.png", "7"]])
    proc = run_cli("validate", f"manifest={bad}")
    assert proc.returncode == 2 and "field 'width'" in proc.stderr and "field 'image'" in proc.stderr


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    rows = [[f"i{n}", f"img/{n}.png", n] for n in range(8)]
    for n in range(8):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    args = [f"manifest={manifest}", *FAST, "conditioning.num_inference_steps=4"]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "svdbatch", *args, f"hydra.run.dir={killed_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(results_of(killed_dir)) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = len(results_of(killed_dir))
    assert 3 <= finished_before < 8, "the kill should land mid-run"

    resumed = run_cli(*args, f"hydra.run.dir={killed_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished_before} skipped" in resumed.stdout
    clean = run_cli(*args, f"hydra.run.dir={tmp_path / 'clean'}")
    assert clean.returncode == 0

    killed_records = results_of(killed_dir)
    assert len(killed_records) == len({r["id"] for r in killed_records}) == 8  # each item once
    clean_hashes = {r["id"]: r["frames_sha256"] for r in results_of(tmp_path / "clean")}
    assert {r["id"]: r["frames_sha256"] for r in killed_records} == clean_hashes
    for n in range(8):
        assert video_file(killed_dir, f"i{n}").read_bytes() == video_file(tmp_path / "clean", f"i{n}").read_bytes()
        assert json.loads((sidecar_file(killed_dir, f"i{n}")).read_text())["status"] == "done"


def test_driver_side_modules_do_not_import_torch():
    # The CLI driver must start without torch so its first worker loads the model meanwhile.
    modules = (
        "svdbatch.cli, svdbatch.engine.driver, svdbatch.engine.pool, svdbatch.engine.crews, svdbatch.engine.plan, svdbatch.engine.shards, "
        "svdbatch.engine.plan_report, svdbatch.engine.prepare, svdbatch.engine.summary, svdbatch.engine.sweep, svdbatch.reports.status, "
        "svdbatch.rundir.dataset, svdbatch.reports.gallery, svdbatch.rundir.verify"
    )
    code = (
        f"import sys, {modules}; heavy = {{'torch', 'diffusers', 'transformers'}} & set(sys.modules); "
        "assert not heavy, sorted(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
