"""The embedded tiny model: a randomly initialised StableVideoDiffusionPipeline made of the
real diffusers/transformers classes, shaped like SVD but small enough for a CPU.

It is built once from a fixed seed, saved with ``save_pretrained`` into a cache directory
and then loaded with the very same ``from_pretrained`` call the real checkpoints use
(models.py), so tests exercise the real code path. Its recipe hash names the cache folder,
so a change of recipe builds a new model instead of reusing an old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from svdbatch.models.quiet import quiet_libraries

TINY_SOURCE = "tiny"
TINY_BUILD_SEED = 0

# Small but shaped like the real model: a four-block VAE gives latents at 1/8 of the image
# (a two-block VAE makes the UNet's attention quadratic in a 4x larger latent and CPU runs
# 20-70x slower), and CLIP sees 224x224 like the real image encoder.
TINY_COMPONENTS: dict[str, dict[str, Any]] = {
    "unet": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
        num_frames=14,
    ),
    "vae": dict(
        block_out_channels=[32, 32, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
    ),
    "image_encoder": dict(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        image_size=224,
        intermediate_size=37,
        patch_size=14,
    ),
    "feature_extractor": dict(crop_size=224, size=224),
    # The real SVD scheduler config (EDM-style Euler with Karras sigmas, v-prediction).
    "scheduler": dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    ),
}


def default_cache_dir() -> Path:
    root = os.environ.get("SVDBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "svdbatch"
    )
    return Path(root)


def tiny_recipe_hash() -> str:
    recipe = json.dumps({"components": TINY_COMPONENTS, "seed": TINY_BUILD_SEED}, sort_keys=True, default=list)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build_tiny_pipeline() -> Any:  # a StableVideoDiffusionPipeline (see loading.LoadedPipeline.pipe)
    """Deterministically build the random-weight tiny pipeline (no download, no GPU)."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    c = TINY_COMPONENTS
    # A private generator state: building the model must not disturb anyone's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_BUILD_SEED)
        unet = UNetSpatioTemporalConditionModel(**c["unet"])
        vae = AutoencoderKLTemporalDecoder(**c["vae"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**c["image_encoder"]))
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**c["scheduler"]),
        feature_extractor=CLIPImageProcessor(**c["feature_extractor"]),
    )


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """Path of the saved tiny model, building it on first use.

    Saved into a temporary sibling and renamed into place, so concurrent workers and a
    killed build never leave a half-written model behind.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-{tiny_recipe_hash()}"
    if (target / "model_index.json").is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        build_tiny_pipeline().save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def weights_fingerprint(directory: Path) -> str:
    """Hash of a saved pipeline's weights and configs (cheap for the tiny model)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
