"""Pipeline factory: the tiny model, real presets without network, memory presets on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from svdbatch.core.config import MemoryConfig, ModelConfig
from svdbatch.core.errors import ModelLoadError
from svdbatch.models.devices import resolve_dtype
from svdbatch.models.identity import model_identity
from svdbatch.models.loading import load_pipeline
from svdbatch.models.tiny import ensure_tiny_model, weights_fingerprint
from tests.conftest import make_cfg

from .runfiles import sidecar_file


def test_tiny_model_is_built_deterministically_and_cached(tmp_path):
    first = ensure_tiny_model(tmp_path / "one")
    second = ensure_tiny_model(tmp_path / "two")
    assert weights_fingerprint(first) == weights_fingerprint(second)
    mtime = (first / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "one") == first
    assert (first / "model_index.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.startswith(".tiny-build-")]


def test_tiny_model_has_the_real_classes_and_shapes():
    loaded = load_pipeline(ModelConfig(), MemoryConfig(), torch.device("cpu"))
    pipe = loaded.pipe
    assert type(pipe).__name__ == "StableVideoDiffusionPipeline"
    assert type(pipe.unet).__name__ == "UNetSpatioTemporalConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLTemporalDecoder"
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.vae_scale_factor == 8  # latents at 1/8 of the image, like the real model
    assert pipe.image_encoder.config.image_size == 224
    assert loaded.dtype == torch.float32 and loaded.identity.fingerprint


def test_pipeline_is_reused_for_the_same_settings():
    a = load_pipeline(ModelConfig(), MemoryConfig(), torch.device("cpu"))
    b = load_pipeline(ModelConfig(), MemoryConfig(), torch.device("cpu"))
    assert a is b


@pytest.mark.parametrize("preset", ["svd", "svd_xt", "svd_xt_1_1"])
def test_real_presets_fail_clearly_without_weights_offline(tmp_path, monkeypatch, preset):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(f"model={preset}", f"model.cache_dir={tmp_path}")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(cfg.model, cfg.memory, torch.device("cpu"))
    message = str(info.value)
    assert cfg.model.source in message and "HF_HUB_OFFLINE" in message and f"`hf download {cfg.model.source}`" in message


def test_real_preset_from_a_local_directory_uses_the_same_loader(tmp_path):
    """model.source may be a local path: the saved tiny model stands in for a downloaded checkpoint."""
    import shutil

    local = tmp_path / "my-svd"
    shutil.copytree(ensure_tiny_model(), local)
    cfg = make_cfg("model=svd", f"model.source={local}")
    loaded = load_pipeline(cfg.model, cfg.memory, torch.device("cpu"))
    assert loaded.identity.source == str(local) and loaded.identity.variant is None  # no fp16 on CPU


def test_gpu_only_settings_degrade_with_a_warning_on_cpu():
    cfg = make_cfg("memory=low", "model.dtype=float16")
    with pytest.warns(UserWarning, match="float32"):
        assert resolve_dtype(cfg.model, torch.device("cpu")) == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_pipeline(cfg.model, cfg.memory, torch.device("cpu"))
    assert any("offload needs a GPU" in str(w.message) for w in caught)
    assert loaded.pipe.device.type == "cpu"
    # memory=low still chunks the feed-forward layers.
    chunked = [m for m in loaded.pipe.unet.modules() if getattr(m, "_chunk_size", None)]
    assert chunked


def test_identity_changes_with_dtype_and_source():
    cpu = torch.device("cpu")
    base = model_identity(ModelConfig(), cpu)
    assert model_identity(ModelConfig(), cpu) == base
    assert model_identity(ModelConfig(name="svd", source="stabilityai/x"), cpu) != base


@pytest.mark.parametrize("source", ["/no/such/dir", "./missing-weights", "../missing-weights", "~/no-such-svd", "a/b/c"])
def test_a_missing_local_source_says_no_such_directory(tmp_path, monkeypatch, source):
    """A path is never sent to the hub: the message names the folder, not a repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_cfg("model=svd", f"model.source='{source}'")  # quoted: Hydra's grammar has no bare '~'
    with pytest.raises(ModelLoadError, match=f"model.source: no such directory: {source}") as info:
        load_pipeline(cfg.model, cfg.memory, torch.device("cpu"))
    assert "hf download" not in str(info.value) and "hub" in str(info.value)  # suggests a repo id instead


def test_a_repo_id_is_still_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg("model=svd", "model.source=someone/my-svd", "model.revision=v2", f"model.cache_dir={tmp_path}")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(cfg.model, cfg.memory, torch.device("cpu"))
    assert "(the Hugging Face hub" in str(info.value) and "`hf download someone/my-svd --revision v2`" in str(info.value)


def test_source_with_a_tilde_is_expanded(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(ensure_tiny_model(), tmp_path / "svd-copy")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_cfg("model=svd", "model.source='~/svd-copy'")
    assert load_pipeline(cfg.model, cfg.memory, torch.device("cpu")).pipe is not None


def test_compile_settings_are_checked_before_loading():
    from svdbatch.models.compile_options import compile_problems

    assert compile_problems(MemoryConfig(compile=False, compile_mode="fast")) == []  # not compiling: not looked at
    problems = compile_problems(MemoryConfig(compile=True, compile_mode="fast", compile_backend="inductor"))
    assert (
        len(problems) == 1
        and problems[0].startswith("memory.compile_mode: must be one of default, ")
        and "got 'fast'" in problems[0]
    )
    assert compile_problems(MemoryConfig(compile=True, compile_backend="nope"))[0].startswith(
        "memory.compile_backend: must be one of"
    )


def test_a_folder_with_only_the_fp16_variant_runs_on_a_cpu_upcast(tmp_path, images):
    """`hf download ... --include "*.fp16.safetensors"` gives a folder without full-precision
    weights: on a CPU (float32) it must load those files, upcast, not fail for want of others."""
    import json

    from svdbatch.engine.driver import run
    from svdbatch.models.identity import only_variant_weights
    from svdbatch.models.tiny import TINY_BUILD_SEED, TINY_COMPONENTS
    from svdbatch.models.tiny_build import build_tiny_pipeline
    from tests.conftest import write_csv

    local = tmp_path / "svd-fp16-only"
    build_tiny_pipeline(TINY_COMPONENTS, TINY_BUILD_SEED).to(torch.float16).save_pretrained(local, variant="fp16")
    weights = sorted(p.name for p in local.rglob("*.safetensors"))
    assert weights and all(".fp16." in name for name in weights)  # really only the variant
    assert only_variant_weights(str(local), "fp16") and not only_variant_weights(str(ensure_tiny_model()), "fp16")

    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1]])
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={tmp_path / 'run'}", "model=svd", f"model.source={local}", "run.devices=cpu")
    loaded = load_pipeline(cfg.model, cfg.memory, torch.device("cpu"))
    assert loaded.dtype == torch.float32 and loaded.identity.variant == "fp16"
    assert {p.dtype for p in loaded.pipe.unet.parameters()} == {torch.float32}
    summary = run(cfg)
    assert (summary.done, summary.failed) == (1, 0)
    sidecar = json.loads((sidecar_file(tmp_path / "run", "a")).read_text())
    assert sidecar["model"]["variant"] == "fp16" and sidecar["model"]["dtype"] == "float32"
