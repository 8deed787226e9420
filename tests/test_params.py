from dataclasses import fields

import pytest

from svdbatch.core.config import ConditioningConfig
from svdbatch.core.params import PARAM_NAMES, RULES, GenParams, ValueProblem, check_conditioning, coerce, resolve_params
from tests.conftest import make_cfg


def test_row_overrides_beat_config_and_memory_caps_apply_last():
    cfg = make_cfg("memory=low", "conditioning.decode_chunk_size=8", fast=False)
    params = resolve_params(cfg.conditioning, cfg.model, cfg.memory, {"motion_bucket_id": 12, "num_frames": 6})
    assert params.motion_bucket_id == 12
    assert params.num_frames == 6
    assert params.decode_chunk_size == 2  # memory=low caps decoding at 2 frames
    assert params.width == cfg.conditioning.width


def test_null_frames_and_chunk_follow_the_model():
    cfg = make_cfg("model=svd_xt", "conditioning.num_frames=null", "conditioning.decode_chunk_size=null", fast=False)
    params = resolve_params(cfg.conditioning, cfg.model, cfg.memory, {})
    assert params.num_frames == 25
    assert params.decode_chunk_size == 25  # diffusers decodes all frames at once by default


def test_chunk_larger_than_frames_is_normalised_so_equal_outputs_share_a_key():
    cfg = make_cfg(fast=False)
    a = resolve_params(cfg.conditioning, cfg.model, cfg.memory, {"decode_chunk_size": 50})
    b = resolve_params(cfg.conditioning, cfg.model, cfg.memory, {})
    assert a == b


@pytest.mark.parametrize(
    "name,value,expected",
    [("width", "64", 64), ("noise_aug_strength", "0.5", 0.5), ("fps", 6.0, 6), ("num_frames", "", None)],
)
def test_coerce_accepts(name, value, expected):
    assert coerce(name, value) == expected


@pytest.mark.parametrize(
    "name,value",
    [
        ("width", "60"),
        ("width", 0),
        ("motion_bucket_id", 256),
        ("motion_bucket_id", -1),
        ("noise_aug_strength", "nan"),
        ("noise_aug_strength", float("inf")),
        ("noise_aug_strength", -0.1),
        ("num_frames", 0),
        ("fps", 2.5),
        ("fps", True),
        ("num_inference_steps", "ten"),
        ("width", ""),
    ],
)
def test_coerce_rejects(name, value):
    with pytest.raises(ValueProblem):
        coerce(name, value)


def test_config_values_are_checked_with_the_same_rules():
    cfg = make_cfg("conditioning.motion_bucket_id=300", "conditioning.width=100")
    problems = check_conditioning(cfg.conditioning)
    assert any(p.startswith("conditioning.motion_bucket_id:") for p in problems)
    assert any(p.startswith("conditioning.width:") and "multiple of 8" in p for p in problems)


def test_every_knob_is_one_genparams_field_with_its_rule_and_a_conditioning_setting():
    """The knob list is GenParams' fields (rules in their metadata), not a list kept by hand:
    each is a conditioning setting, a manifest column and a key of every sidecar's params."""
    assert PARAM_NAMES == tuple(f.name for f in fields(GenParams)) == tuple(RULES)
    conditioning = {f.name for f in fields(ConditioningConfig)}
    assert set(PARAM_NAMES) <= conditioning
    assert conditioning - set(PARAM_NAMES) == {"resize", "pad_color", "background"}
