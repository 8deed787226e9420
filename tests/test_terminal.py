"""What the terminal that started a run shows: log lines above the progress bar, not glued
onto it, and after a submitit sweep one summary line per job and the worst exit code."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import FAST, REPO, make_image, run_cli, write_csv

LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[\w+\] - ")


def visible_lines(stream: str) -> list[str]:
    """What a terminal shows for each line: the text after the last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in stream.split("\n")]


def test_log_lines_do_not_share_a_line_with_the_progress_bar(tmp_path):
    make_image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [["ok", "ok.png"], ["bad", "bad.png"]])
    proc = run_cli(
        f"manifest={manifest}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "run.check_images=false",
        "run.num_threads=1",
        "run.progress=true",
        *FAST,
    )
    assert proc.returncode == 1, proc.stderr
    assert "item/s" in proc.stderr or "s/item" in proc.stderr, "the bar must have been drawn"
    lines = visible_lines(proc.stderr)
    logged = [line for line in lines if LOG_LINE.search(line)]
    assert any("loaded tiny" in line for line in logged) and any("item bad failed" in line for line in logged)
    for line in logged:
        assert LOG_LINE.match(line), f"a log line glued onto the bar: {line!r}"
        assert "%|" not in line


def test_submitit_sweep_prints_each_jobs_summary_and_the_worst_exit_code(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    for n in range(4):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    (tmp_path / "img" / "3.png").write_bytes(b"not an image")  # one failed item: its job exits 1
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/{n}.png", n] for n in range(4)])
    sweep = tmp_path / "sweep"
    # An earlier sweep's job in the same sweep dir: not this sweep's, so neither printed nor counted.
    (sweep / ".svdbatch-jobs").mkdir(parents=True)
    stale = {"job": 7, "run_dir": "/elsewhere", "line": "stale", "exit_code": 2, "process": "otherhost:1"}
    (sweep / ".svdbatch-jobs" / "7.json").write_text(json.dumps(stale))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "svdbatch",
            "-m",
            "hydra/launcher=submitit_local",
            "run.shard.count=2",
            "run.shard.index=0,1",
            f"manifest={manifest}",
            *FAST,
            "run.num_threads=1",
            "run.check_images=false",
            f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the worst job's code, though it ran in another process
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("job ")]
    assert [line.split(":")[0] for line in jobs] == ["job 0", "job 1"], proc.stdout
    assert not (sweep / ".svdbatch-jobs").exists()  # read back, then removed
    (run_dir,) = {p.parent for p in sweep.rglob("layout.json")}
    assert all(line.endswith(f"-> {run_dir}") for line in jobs)
    done = sum(int(re.search(r"(\d+) done", line).group(1)) for line in jobs)
    failed = sum(int(re.search(r"(\d+) failed", line).group(1)) for line in jobs)
    assert (done, failed) == (3, 1)
