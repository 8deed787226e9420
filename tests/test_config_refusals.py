"""Configs a run refuses are refused everywhere, the same way: keys the schema does not know
(even added with Hydra's `+`/`++`), and shard settings, by a run, a sweep, `validate` and the
Python-side composition alike."""

from __future__ import annotations

import pytest

from svdbatch import run
from svdbatch.commands import validate
from svdbatch.core.errors import EXIT_BAD_INPUT, ConfigError
from tests.conftest import FAST, SAMPLE_CSV, make_cfg, run_cli

UNKNOWN = [
    ("+run.seeed=3", "run.seeed: unknown key (did you mean run.seed?)"),
    ("++run.seeed=3", "run.seeed: unknown key (did you mean run.seed?)"),
    ("+conditioning.motion_bucket=60", "conditioning.motion_bucket: unknown key (did you mean conditioning.motion_bucket_id?)"),
    ("+run.shard.indx=0", "run.shard.indx: unknown key (did you mean run.shard.index?)"),
    ("+colour=red", "colour: unknown key"),
    ("~fetch", "fetch: removed (~fetch), but every run needs it"),
]


@pytest.mark.parametrize("override, message", UNKNOWN)
def test_python_side_composition_refuses_unknown_keys(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        make_cfg(f"manifest={SAMPLE_CSV}", override)


def test_keys_of_open_sections_may_still_be_added():
    """model.fixed_conditioning is a Dict: its keys are checked by the model check, not the schema."""
    cfg = make_cfg(f"manifest={SAMPLE_CSV}", "+model.fixed_conditioning.fps=6")
    assert cfg.model.fixed_conditioning == {"fps": 6}


@pytest.mark.parametrize("override", ["+run.seeed=3", "++run.seeed=3"])
def test_a_run_with_an_added_unknown_key_exits_2_and_records_nothing(tmp_path, override):
    run_dir = tmp_path / "run"
    proc = run_cli(f"manifest={SAMPLE_CSV}", override, *FAST, f"hydra.run.dir={run_dir}")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "run.seeed: unknown key (did you mean run.seed?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing generated, and no config.yaml claiming a setting that never applied.
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "videos").exists()


def test_a_sweep_with_an_added_unknown_key_exits_2_at_every_point(tmp_path):
    proc = run_cli("-m", f"manifest={SAMPLE_CSV}", "+run.seeed=3", "conditioning.fps=6,7", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert proc.stderr.count("run.seeed: unknown key") == 2 and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("records")) and not list(tmp_path.rglob("videos"))


def test_validate_refuses_an_added_unknown_key(capsys):
    assert validate([f"manifest={SAMPLE_CSV}", "+run.seeed=3"]) == EXIT_BAD_INPUT
    assert "run.seeed: unknown key" in capsys.readouterr().err


# -- shard settings: validate refuses exactly what the run refuses -------------------------
BAD_SHARDS = [
    (["run.shard.index=2", "run.shard.count=2"], {}, "run.shard: index must be in [0, count), got index=2 count=2"),
    (["run.shard.index=0", "run.shard.count=0"], {}, "run.shard: index must be in [0, count), got index=0 count=0"),
    (["run.shard.index=-1", "run.shard.count=2"], {}, "got index=-1 count=2"),
    (["run.shard.index=1"], {}, "run.shard: set both index and count, or neither"),
    (["run.shard.count=4"], {}, "run.shard: set both index and count, or neither"),
    ([], {"RANK": "3", "WORLD_SIZE": "2"}, "run.shard: index must be in [0, count), got index=3 count=2"),
    ([], {"RANK": "one", "WORLD_SIZE": "2"}, "run.shard: from the environment, RANK='one' is not an integer"),
    ([], {"SLURM_ARRAY_TASK_ID": "x"}, "run.shard: from the environment, SLURM_ARRAY_TASK_ID='x' is not an integer"),
]


@pytest.mark.parametrize("overrides, env, message", BAD_SHARDS)
def test_validate_and_run_refuse_the_same_shard_settings(tmp_path, monkeypatch, capsys, overrides, env, message):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    assert validate([f"manifest={SAMPLE_CSV}", *overrides]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError) as refused:
        run(make_cfg(f"manifest={SAMPLE_CSV}", f"run.dir={run_dir}", "run.progress=false", *overrides))
    assert message in str(refused.value)
    assert not (run_dir / "videos").exists()


def test_validate_accepts_the_shard_settings_a_run_accepts(capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert validate([f"manifest={SAMPLE_CSV}", "run.shard.index=1", "run.shard.count=2"]) == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert validate([f"manifest={SAMPLE_CSV}"]) == 0
    # Like the run it checks for: the launcher's shard validates its own rows only.
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1] and out[1].endswith("(shard 1 of 2; 2 rows left to the other shards)"), out
