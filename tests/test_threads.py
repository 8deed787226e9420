"""The default intra-op thread count: usable physical cores shared out between workers,
resolved once, the same for the same machine and settings, and recorded in every sidecar."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from svdbatch import run
from svdbatch.core.errors import ConfigError
from svdbatch.models.identity import default_num_threads, usable_cores
from tests.conftest import REPO, make_cfg


def test_default_is_cores_over_workers_and_stable():
    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    cpu = torch.device("cpu")
    assert default_num_threads([cpu]) == cores
    assert default_num_threads([cpu, cpu]) == max(1, cores // 2)
    assert default_num_threads([cpu] * (cores + 3)) == 1
    torch.set_num_threads(1)  # what an earlier run in this process left behind does not matter
    assert default_num_threads([cpu]) == cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_default_follows_the_cpu_affinity_it_is_given():
    """As under taskset or a Slurm allocation of one core: one thread, whatever the machine has."""
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from svdbatch.models.identity import usable_cores; print(usable_cores())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "1"


def test_the_resolved_default_is_recorded_in_the_sidecar(tmp_path, manifest4):
    summary = run(make_cfg(f"manifest={manifest4}", f"run.dir={tmp_path / 'run'}", "run.limit=1", "run.progress=false"))
    assert summary.done == 1
    sidecar = json.loads(next((tmp_path / "run" / "items").glob("*/*.json")).read_text())
    assert sidecar["num_threads"] == default_num_threads([torch.device("cpu")])


def test_num_threads_below_1_is_refused(tmp_path, manifest4):
    with pytest.raises(ConfigError, match="run.num_threads: must be >= 1"):
        run(make_cfg(f"manifest={manifest4}", f"run.dir={tmp_path / 'run'}", "run.num_threads=0"))
