"""The public Python API (svdbatch/api.py, docs/api.md): the door the CLI and notebooks use."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

import svdbatch
from svdbatch.core.config import ConditioningConfig, Config, DType, RunConfig, typed
from svdbatch.core.errors import ManifestError, RunDirError
from svdbatch.core.params import check_conditioning
from svdbatch.engine import driver
from tests.conftest import FAST, write_csv


def test_import_svdbatch_is_light_and_the_api_loads_on_first_use():
    code = (
        "import sys, svdbatch; "
        "assert not {'torch', 'diffusers', 'hydra', 'svdbatch.api'} & set(sys.modules), sorted(sys.modules); "
        "svdbatch.status; assert 'svdbatch.api' in sys.modules; "
        "assert not {'torch', 'diffusers', 'hydra'} & set(sys.modules), 'the API imported torch or hydra'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compose_run_status_open_run_verify(tmp_path, manifest4):
    run_dir = tmp_path / "run"
    cfg = svdbatch.compose(*FAST, f"manifest={manifest4}", f"run.dir={run_dir}")
    assert svdbatch.validate(cfg).valid == 4
    summary = svdbatch.run(cfg)
    assert (summary.done, summary.failed, summary.run_dir) == (4, 0, run_dir)

    items = {item.id: item for item in svdbatch.open_run(run_dir)}
    assert sorted(items) == ["a", "b", "c", "d"]
    assert all(item.status == "done" and item.video is not None and item.video.is_file() for item in items.values())
    assert items["a"].seed == 1 and items["b"].params["motion_bucket_id"] == 30 and items["d"].params["fps"] == 5

    report = svdbatch.status(run_dir)
    assert report["counts"]["done"] == 4
    checked = svdbatch.verify(run_dir)
    assert len(checked.items) == 4 and checked.damaged == []

    items["b"].video.write_bytes(b"not a video")
    damaged = svdbatch.verify(run_dir, repair=True)
    assert [r.item_id for r in damaged.damaged] == ["b"] and damaged.set_aside_in is not None
    assert sorted(i.id for i in svdbatch.open_run(run_dir)) == ["a", "c", "d"]
    again = svdbatch.run(cfg)
    assert (again.done, again.skipped) == (1, 3)


def test_open_run_lists_failures_and_invalid_rows_with_their_reason(tmp_path, images):
    manifest = write_csv(
        tmp_path / "m.csv", ["id", "image", "motion_bucket_id"], [["ok", "img/a.png", 7], ["broken", "img/b.png", 999]]
    )
    run_dir = tmp_path / "run"
    cfg = svdbatch.compose(*FAST, f"manifest={manifest}", f"run.dir={run_dir}", "run.strict=false")
    svdbatch.run(cfg)
    by_id = {item.id: item for item in svdbatch.open_run(run_dir)}
    assert by_id["ok"].status == "done"
    assert by_id["broken"].status == "invalid" and "motion_bucket_id" in by_id["broken"].error


def test_bad_input_raises_the_documented_errors(tmp_path):
    with pytest.raises(ConfigCompositionException, match="motion_bukcet_id"):
        svdbatch.compose("manifest=x.csv", "conditioning.motion_bukcet_id=3")
    with pytest.raises(RunDirError):
        svdbatch.status(tmp_path)
    with pytest.raises(RunDirError):
        list(svdbatch.open_run(tmp_path))
    missing = write_csv(tmp_path / "m.csv", ["id", "image"], [["a", "nope.png"]])
    with pytest.raises(ManifestError, match="nope.png"):
        svdbatch.validate(svdbatch.compose(*FAST, f"manifest={missing}", f"run.dir={tmp_path / 'r'}"))


def test_run_hands_the_engine_the_typed_config_dataclass(tmp_path, manifest4, monkeypatch):
    """compose gives a DictConfig to edit; run converts it once, at its door, into the Config
    dataclass (nested dataclasses, enums, run.dir resolved) that the engine reads."""
    seen = []
    monkeypatch.setattr(driver, "run", lambda config: seen.append(config) or "summary")
    cfg = svdbatch.compose(*FAST, f"manifest={manifest4}", f"run.dir={tmp_path / 'run'}", "run.devices=[cpu]")
    cfg.run.seed = 5  # edited after compose, as a notebook does
    assert svdbatch.run(cfg) == "summary"
    (config,) = seen
    assert type(config) is Config and type(config.run) is RunConfig and type(config.conditioning) is ConditioningConfig
    assert config.run.seed == 5 and config.run.devices == ["cpu"] and type(config.run.devices) is list
    assert config.model.dtype is DType.auto and config.run.dir == str(tmp_path / "run")
    assert svdbatch.run(config) == "summary" and seen[1] is config  # a Config goes in as it is

    assert check_conditioning(ConditioningConfig()) == []  # the checks read the dataclasses themselves
    assert check_conditioning(ConditioningConfig(motion_bucket_id=-1)) != []
    with pytest.raises(Exception, match="fps"):
        typed(ConditioningConfig, {"fps": "fast"})  # a wrong type is refused when converting
