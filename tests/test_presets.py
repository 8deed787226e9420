"""Model-card presets and the warning for knobs a checkpoint was trained with fixed."""

from __future__ import annotations

import logging

import pytest

from svdbatch import run
from svdbatch.core.config import plain
from svdbatch.engine.plan import fixed_conditioning_warning, plan_run
from svdbatch.inputs.manifest import read_manifest
from svdbatch.rundir.store import RunStore
from tests.conftest import make_cfg, write_csv


@pytest.mark.parametrize(
    "preset,frames,fixed",
    [("svd", 14, {}), ("svd_xt", 25, {}), ("svd_xt_1_1", 25, {"fps": 6, "motion_bucket_id": 127})],
)
def test_presets_follow_the_model_cards(preset, frames, fixed):
    cfg = make_cfg(f"model={preset}", f"conditioning={preset}", fast=False)
    assert cfg.model.num_frames == frames and cfg.conditioning.num_frames == frames
    assert plain(cfg.model)["fixed_conditioning"] == fixed
    assert (cfg.conditioning.width, cfg.conditioning.height) == (1024, 576)
    for knob, value in fixed.items():
        assert cfg.conditioning[knob] == value  # the matching conditioning preset is on-card


def plan(cfg, run_dir):
    manifest = read_manifest(cfg.manifest, run_seed=cfg.run.seed)
    store = RunStore(run_dir, cfg.output.format)
    return plan_run(manifest.items, cfg.conditioning, cfg.model, cfg.memory, {"source": cfg.model.source}, store).all


def test_xt_1_1_with_its_own_conditioning_does_not_warn_but_other_values_do(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "fps"], [["a", "img/a.png", None], ["b", "img/b.png", 8]])
    on_card = make_cfg(f"manifest={manifest}", "model=svd_xt_1_1", "conditioning=svd_xt_1_1", fast=False)
    planned = plan(on_card, tmp_path / "run")
    warning = fixed_conditioning_warning(planned, on_card.model)
    assert "b=8" in warning and "a=" not in warning and "fps=6, motion_bucket_id=127" in warning
    # The svd_xt conditioning preset (fps 7) is off-card for xt 1.1 on every row.
    off_card = make_cfg(f"manifest={manifest}", "model=svd_xt_1_1", "conditioning=svd_xt", fast=False)
    assert "a=7" in fixed_conditioning_warning(plan(off_card, tmp_path / "run"), off_card.model)
    # svd_xt was trained with varying fps and motion: no warning even for off-default rows.
    xt = make_cfg(f"manifest={manifest}", "model=svd_xt", "conditioning=svd_xt", fast=False)
    assert fixed_conditioning_warning(plan(xt, tmp_path / "run"), xt.model) is None


def test_rows_that_vary_fixed_knobs_are_warned_about_on_a_real_run(tmp_path, images, caplog):
    manifest = write_csv(
        tmp_path / "m.csv", ["id", "image", "motion_bucket_id"], [["keeps", "img/a.png", None], ["moves", "img/b.png", 30]]
    )
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={tmp_path / 'run'}", "++model.fixed_conditioning={motion_bucket_id:127}")
    with caplog.at_level(logging.WARNING, logger="svdbatch"):
        summary = run(cfg)
    assert summary.done == 2  # a warning, not an error
    (message,) = [r.getMessage() for r in caplog.records if "trained with fixed" in r.getMessage()]
    assert "motion_bucket_id: moves=30 (1 items)" in message and "keeps" not in message
