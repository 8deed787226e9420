"""The tiny model's construction from its recipe (tiny.py): random weights of the real classes."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from svdbatch.models.quiet import quiet_libraries


def build_tiny_pipeline(
    components: dict[str, Any], seed: int
) -> Any:  # a StableVideoDiffusionPipeline (see loading.LoadedPipeline.pipe)
    """Deterministically build the random-weight tiny pipeline (no download, no GPU)."""
    quiet_libraries()
    c = components
    # A private generator state: building the model must not disturb anyone's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
