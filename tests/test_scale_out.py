"""Several workers, shards and launchers: same frames whatever the layout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from svdbatch import run
from svdbatch.core.compose import sweep_subdir
from svdbatch.core.errors import ConfigError, ModelLoadError
from svdbatch.engine.shards import Shard, resolve_shard, select_shard, shard_from_env
from svdbatch.inputs.manifest import read_manifest
from svdbatch.models.devices import resolve_devices
from tests.conftest import FAST, REPO, make_cfg, make_image, run_cli, write_csv

from .runfiles import failures_of, results_of, video_file


@pytest.fixture
def manifest8(tmp_path) -> Path:
    for n in range(8):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    return write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/{n}.png", 100 + n] for n in range(8)])


def frame_hashes(run_dir: Path) -> dict[str, str]:
    return {r["id"]: r["frames_sha256"] for r in results_of(run_dir)}


def test_shards_partition_the_manifest_and_are_stable_under_reordering(manifest8):
    items = read_manifest(manifest8).items
    shards = [select_shard(items, Shard(i, 3)) for i in range(3)]
    ids = [item.id for shard in shards for item in shard]
    assert sorted(ids) == sorted(item.id for item in items)  # union is the manifest, no overlap
    assert all(shards)  # 8 items over 3 shards: none empty here
    reordered = list(reversed(items))
    assert {i.id for i in select_shard(reordered, Shard(1, 3))} == {i.id for i in shards[1]}


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, Shard(0, 1)),
        ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, Shard(2, 4)),  # torchrun / accelerate launch
        ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "5"}, Shard(2, 5)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3"}, Shard(3, 4)),
        # Under submitit, array tasks are sweep points, not shards.
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SUBMITIT_EXECUTOR": "slurm"}, Shard(0, 1)),
    ],
)
def test_shard_from_launcher_environment(environ, expected):
    assert shard_from_env(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [{"RANK": "3", "WORLD_SIZE": "4"}, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "7"}],
)
def test_explicit_shard_wins_over_the_launcher_environment(tmp_path, monkeypatch, images, environ):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    from_env = shard_from_env(environ)
    assert from_env.count > 1 and resolve_shard(None, None) == from_env  # the environment is read...
    assert resolve_shard(0, 1) == Shard(0, 1)  # ...unless run.shard is set
    assert resolve_shard(1, 2) == Shard(1, 2)
    if "RANK" not in environ:
        return  # one real run is enough
    # A real run under that environment with run.shard 0 of 1 does every row, not its env shard
    # (which holds none of these four ids).
    assert not select_shard(
        read_manifest(write_csv(tmp_path / "m.csv", ["id", "image"], [[n, f"img/{n}.png"] for n in "abcd"])).items, from_env
    )
    manifest = tmp_path / "m.csv"
    summary = run(make_cfg(f"manifest={manifest}", f"run.dir={tmp_path / 'run'}", "run.shard.index=0", "run.shard.count=1"))
    assert summary.done == 4


def test_bad_shards_are_config_errors():
    with pytest.raises(ConfigError):
        resolve_shard(2, 2)
    with pytest.raises(ConfigError):
        resolve_shard(0, None)


def test_devices_on_a_cpu_machine():
    assert resolve_devices("auto", workers=3) == [torch.device("cpu")] * 3
    assert resolve_devices(["cpu", "cpu"]) == [torch.device("cpu")] * 2
    # A device that is not there is a config mistake (exit 2 with the field), not a load failure.
    with pytest.raises(ConfigError, match="run.devices: 'nonsense' is not a device"):
        resolve_devices(["nonsense"])
    with pytest.raises(ConfigError, match="run.devices is empty"):
        resolve_devices([])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_devices(2)


def test_two_workers_two_shards_and_one_worker_give_identical_frames(tmp_path, manifest8):
    base = [f"manifest={manifest8}", "run.num_threads=1"]
    one = run(make_cfg(*base, f"run.dir={tmp_path / 'one'}"))
    two = run(make_cfg(*base, f"run.dir={tmp_path / 'two'}", "run.workers=2"))
    assert (one.done, two.done) == (8, 8)
    for index in range(2):
        shard = run(make_cfg(*base, f"run.dir={tmp_path / 'shards'}", f"run.shard.index={index}", "run.shard.count=2"))
        assert shard.done + shard.skipped < 8
    reference = frame_hashes(tmp_path / "one")
    assert len(set(reference.values())) == 8
    assert frame_hashes(tmp_path / "two") == reference
    assert frame_hashes(tmp_path / "shards") == reference
    records = list(results_of(tmp_path / "two"))
    assert len(records) == 8  # no duplicates, no torn lines with two writers


def test_batched_rows_match_single_calls_closely(tmp_path, manifest8, monkeypatch):
    """Batching is opt-in: diffusers' batched path is not bit-identical to single calls."""
    import numpy as np

    from svdbatch.engine.worker import Worker
    from svdbatch.rundir.outputs import read_video

    calls = []
    generate = Worker.generate

    def counting(self, images, params, seeds):
        calls.append(sorted(seeds))
        return generate(self, images, params, seeds)

    monkeypatch.setattr(Worker, "generate", counting)
    base = [f"manifest={manifest8}", "output=frames", "run.limit=4"]
    run(make_cfg(*base, f"run.dir={tmp_path / 'single'}"))
    assert calls == [[100], [101], [102], [103]]  # one pipeline call per row
    calls.clear()
    batched = run(make_cfg(*base, f"run.dir={tmp_path / 'batched'}", "run.batch_size=4"))
    assert batched.done == 4
    assert calls == [[100, 101, 102, 103]]  # the four rows in one pipeline call
    for n in range(4):
        a = read_video(video_file(tmp_path / "single", f"i{n}", "")).astype(int)
        b = read_video(video_file(tmp_path / "batched", f"i{n}", "")).astype(int)
        assert np.abs(a - b).max() <= 1  # at most one quantisation step apart


def spawned_workers(pid: int) -> list:
    """Live worker processes of a run (children that exit, e.g. ffmpeg, are ignored)."""
    workers = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # exited (or a zombie) since it was listed
            pass
    return workers


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path, manifest8):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "svdbatch",
            f"manifest={manifest8}",
            *FAST,
            "conditioning.num_inference_steps=6",
            "run.workers=2",
            "run.num_threads=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(results_of(run_dir)) < 2:
        time.sleep(0.05)
    workers = spawned_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "8 done" in out
    assert "died" in err
    records = results_of(run_dir)
    assert sorted(r["id"] for r in records) == [f"i{n}" for n in range(8)]  # each exactly once
    clean = run(
        make_cfg(
            f"manifest={manifest8}", "conditioning.num_inference_steps=6", "run.num_threads=1", f"run.dir={tmp_path / 'clean'}"
        )
    )
    assert clean.done == 8
    assert frame_hashes(run_dir) == frame_hashes(tmp_path / "clean")


README_SUBMITIT = [
    "-m",
    "hydra/launcher=submitit_local",
    "run.shard.count=2",
    "run.shard.index=0,1",
    "manifest=manifests/sample.csv",
]


def readme_cwd(root: Path) -> Path:
    """A working directory where the README's relative paths mean what they say."""
    shutil.copytree(REPO / "manifests", root / "manifests")
    return root


def test_readme_submitit_local_command_gives_one_run_dir_equal_to_one_worker(tmp_path):
    """The README's multi-node recipe, literally: both shards in outputs/sample/, every item
    once, the frames of a plain run; resubmitting it skips everything."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    cwd = readme_cwd(tmp_path / "sharded")
    proc = run_cli(*README_SUBMITIT, cwd=cwd, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = {p.parent for p in (cwd / "outputs").rglob("layout.json")}
    assert run_dirs == {cwd / "outputs" / "sample"}, "both shards must write into outputs/sample/"
    records = results_of(cwd / "outputs" / "sample")
    assert sorted(r["id"] for r in records) == ["rocket", "sunset", "waves"]  # each exactly once
    plain_run = run_cli("manifest=manifests/sample.csv", cwd=readme_cwd(tmp_path / "plain"), timeout=900)
    assert plain_run.returncode == 0, plain_run.stderr[-3000:]
    assert frame_hashes(cwd / "outputs" / "sample") == frame_hashes(tmp_path / "plain" / "outputs" / "sample")
    again = run_cli(*README_SUBMITIT, cwd=cwd, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(results_of(cwd / "outputs" / "sample")) == 3
    # submitit's jobs print into their own logs; the summaries say what each shard did.
    summaries = [
        line
        for log in (cwd / "outputs" / "sample" / ".submitit").rglob("*_log.out")
        for line in log.read_text().splitlines()
        if line.startswith("svdbatch: ")
    ]
    assert len(summaries) == 4 and sum(" 0 done," in line for line in summaries) == 2, summaries


def test_basic_launcher_shards_share_the_run_dir(tmp_path):
    cwd = readme_cwd(tmp_path)
    args = ["-m", "run.shard.count=2", "run.shard.index=0,1", "manifest=manifests/sample.csv", *FAST]
    proc = run_cli(*args, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample = cwd / "outputs" / "sample"
    fast_dir = sample / ",".join(sorted(FAST))  # FAST's settings change outputs: they name the folder
    assert {p.parent for p in (cwd / "outputs").rglob("layout.json")} == {fast_dir}
    assert sorted(r["id"] for r in results_of(fast_dir)) == ["rocket", "sunset", "waves"]
    assert sorted(p.name for p in fast_dir.glob("config.shard-*")) == ["config.shard-0-of-2.yaml", "config.shard-1-of-2.yaml"]
    again = run_cli(*args, cwd=cwd, timeout=900)
    assert again.stdout.count(" 0 done, ") == 2 and "3 skipped" not in again.stdout  # each shard skips its own


def test_torchrun_ranks_share_the_run_dir(tmp_path):
    """torchrun / accelerate set RANK and WORLD_SIZE: plain runs, one shard each, one folder."""
    cwd = readme_cwd(tmp_path)
    for rank in (0, 1):
        proc = subprocess.run(
            [sys.executable, "-m", "svdbatch", "manifest=manifests/sample.csv", *FAST],
            cwd=cwd,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    sample = cwd / "outputs" / "sample"
    assert {p.parent for p in (cwd / "outputs").rglob("layout.json")} == {sample}
    assert sorted(r["id"] for r in results_of(sample)) == ["rocket", "sunset", "waves"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["run.shard.count=2", "run.shard.index=1", "manifest=m.csv"], ""),
        (["run.workers=2", "run.some_future_setting=1", "fetch.retries=5", "run.check_images=full"], ""),
        (["conditioning.fps=6", "run.shard.index=0", "model=svd_xt"], "conditioning.fps=6,model=svd_xt"),
        (["+run.seed=3", "model.source=/data/svd", "model.cache_dir=/c"], "+run.seed=3,model.source=_data_svd"),
        (["memory=low", "memory.offload=none", "output.webdataset=true", "output.format=gif"], "memory=low,output.format=gif"),
    ],
)
def test_sweep_subdir_is_named_after_output_changing_overrides_only(overrides, expected):
    assert sweep_subdir(overrides) == expected


def test_sweep_subdir_of_many_overrides_stays_a_valid_file_name():
    long = sweep_subdir([f"conditioning.pad_color=rgb({n},{n},{n})" for n in range(40)] + ["conditioning.fps=6"])
    assert len(long.encode()) <= 200 and long != sweep_subdir(["conditioning.fps=7"] * 41)


def leaf_settings(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, dict):
            yield from leaf_settings(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


CHANGED = {  # a different valid value for settings whose default gives no generic one
    "model.revision": "abc",
    "model.variant": "fp16",
    "model.dtype": "float16",
    "model.source": "some/repo",
    "conditioning.num_frames": 5,
    "conditioning.decode_chunk_size": 2,
    "conditioning.width": 72,
    "conditioning.height": 72,
    "conditioning.pad_color": "red",
    "conditioning.background": "blue",
    "conditioning.resize": "pad",
    "memory.max_decode_chunk_size": 1,
    "output.fps": 3,
    "output.format": "gif",
    "memory.offload": "model",
    "model.fixed_conditioning": {"fps": 3},
    "run.engine": "ray",
    "run.reuse_from": ["/elsewhere"],
}


def test_every_setting_that_changes_an_item_key_names_sweep_folders(tmp_path, manifest8):
    """The allow-list can only miss a setting by not listing it: change each setting of the
    schema in turn and check that those which change an item's key are in it."""
    from omegaconf import OmegaConf

    from svdbatch.core.compose import changes_outputs
    from svdbatch.core.config import plain
    from svdbatch.engine.plan import plan_run
    from svdbatch.models.identity import model_identity
    from svdbatch.rundir.store import RunStore

    base = make_cfg(f"manifest={manifest8}", f"run.dir={tmp_path / 'run'}", "run.limit=1")
    (item,) = read_manifest(manifest8).items[:1]

    def key_of(cfg) -> str:
        store = RunStore(tmp_path / "run", cfg.output.format)
        store.prepare()  # item paths lie in bucket folders under videos/, made by prepare
        identity = model_identity(cfg.model, torch.device("cpu")).as_dict()
        from dataclasses import replace as dc_replace

        from svdbatch.inputs.ids import derive_seed

        planned = dc_replace(item, seed=derive_seed(cfg.run.seed, item.id), seed_derived=True)
        (entry,) = plan_run([planned], cfg.conditioning, cfg.model, cfg.memory, identity, store).all
        return f"{entry.key}|{store.video_path(item.id).name}"

    reference = key_of(base)
    missing = []
    for name, value in leaf_settings(plain(base)):
        if name in ("manifest", "run.name", "run.dir"):
            continue
        if name == "model.cache_dir":
            new = str(tmp_path / "model-cache")  # builds the tiny model there: never in the repo
        elif name in CHANGED:
            new = CHANGED[name]
        elif isinstance(value, bool):
            new = not value
        elif isinstance(value, (int, float)):
            new = value + 1
        elif value is None:
            new = 1
        else:
            new = f"{value}x"
        cfg = base.copy()
        try:
            OmegaConf.update(cfg, name, new, merge=False)
            changed = key_of(cfg) != reference
        except Exception:  # a value this generic change makes invalid: such a setting is listed in CHANGED
            missing.append(f"{name} (no valid changed value)")
            continue
        if changed and not changes_outputs(name):
            missing.append(name)
    assert not missing, f"settings that change item keys but are not in OUTPUT_SETTINGS: {missing}"


def test_workers_that_cannot_load_the_model_fail_the_run_clearly(tmp_path, manifest8):
    (tmp_path / "not-a-model").mkdir()  # exists (a missing folder is refused up front), holds no weights
    cfg = make_cfg(
        f"manifest={manifest8}",
        f"run.dir={tmp_path / 'run'}",
        "model=svd",
        f"model.source={tmp_path / 'not-a-model'}",
        "run.workers=2",
    )
    with pytest.raises(ModelLoadError, match="no worker could load the model"):
        run(cfg)
    failures = list(failures_of(tmp_path / "run"))
    assert len(failures) == 8 and all("left for the next run" in f["error"] for f in failures)
