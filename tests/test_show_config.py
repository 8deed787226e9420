"""Printing the config as Hydra users do (--cfg job/hydra/all, --resolve, --info, and with -m),
as real subprocesses: exit 0, and the printed run.dir is the folder a real run writes to."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.conftest import FAST, REPO, run_cli


@pytest.fixture
def workdir(tmp_path):
    """A directory to run from, holding the sample manifests (relative paths as in the README)."""
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    return tmp_path


def test_cfg_job_resolve_prints_the_run_dir_a_run_really_uses(workdir):
    args = ["manifest=manifests/sample.csv", "run.limit=1", "run.progress=false", *FAST]
    printed = run_cli(*args, "--cfg", "job", "--resolve", cwd=workdir)
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)
    assert config["run"]["dir"] == str(workdir / "outputs" / "sample")
    assert config["run"]["name"] == "sample"

    real = run_cli(*args, cwd=workdir)
    assert real.returncode == 0, real.stderr
    written = yaml.safe_load((workdir / "outputs" / "sample" / "config.yaml").read_text())
    assert written["run"]["dir"] == config["run"]["dir"]


def test_the_readme_command_with_cfg_job_resolve():
    """Literally `svdbatch manifest=manifests/sample.csv --cfg job --resolve` from the checkout."""
    printed = run_cli("manifest=manifests/sample.csv", "--cfg", "job", "--resolve")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["run"]["dir"] == str(REPO / "outputs" / "sample")


def test_cfg_hydra_cfg_all_and_info_exit_0(workdir):
    hydra_cfg = run_cli("manifest=manifests/sample.csv", "--cfg", "hydra", cwd=workdir)
    assert hydra_cfg.returncode == 0, hydra_cfg.stderr
    assert yaml.safe_load(hydra_cfg.stdout)["hydra"]["run"]["dir"] == "outputs/${run.name}"
    everything = run_cli("manifest=manifests/sample.csv", "--cfg", "all", "--resolve", cwd=workdir)
    assert everything.returncode == 0, everything.stderr
    config = yaml.safe_load(everything.stdout)
    assert config["hydra"]["run"]["dir"] == "outputs/sample"
    assert config["run"]["dir"] == str(workdir / "outputs" / "sample")
    # Hydra alone cannot resolve its own node here (it refers to run.name, a job key).
    resolved = run_cli("manifest=manifests/sample.csv", "--cfg", "hydra", "--resolve", cwd=workdir)
    assert resolved.returncode == 0, resolved.stderr
    assert list(yaml.safe_load(resolved.stdout)) == ["hydra"]
    assert yaml.safe_load(resolved.stdout)["hydra"]["run"]["dir"] == "outputs/sample"
    shown = run_cli("manifest=manifests/sample.csv", "--info", cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert "manifest: manifests/sample.csv" in shown.stdout + shown.stderr


def test_multirun_cfg_job_prints_each_sweep_points_real_folder(workdir):
    """Hydra itself refuses `-m ... --cfg job`; svdbatch prints one YAML document per point,
    and each run.dir is the folder the real sweep then writes."""
    args = [
        "-m",
        "conditioning.motion_bucket_id=60,180",
        "manifest=manifests/sample.csv",
        "run.limit=1",
        "run.progress=false",
        *FAST,
    ]
    printed = run_cli(*args, "--cfg", "job", "--resolve", cwd=workdir)
    assert printed.returncode == 0, printed.stderr
    documents = list(yaml.safe_load_all(printed.stdout))
    assert [doc["conditioning"]["motion_bucket_id"] for doc in documents] == [60, 180]
    printed_dirs = [doc["run"]["dir"] for doc in documents]
    assert all(d.startswith(str(workdir / "outputs" / "sample") + "/") for d in printed_dirs)

    real = run_cli(*args, cwd=workdir)
    assert real.returncode == 0, real.stderr
    written = sorted(str(p.parent) for p in (workdir / "outputs" / "sample").glob("*/config.yaml"))
    assert written == sorted(printed_dirs)
