"""The NaN rescue ladder: fp16 SVD sometimes decodes NaN/inf or all-black frames (worst at
small sizes). Such an item is generated again with more precision, one step at a time:

    as loaded   the configured dtype (float16 on CUDA by default)
    vae_fp32    the VAE decode upcast to float32 (the latents are cast up before decoding)
    bf16/fp32   the whole pipeline in bfloat16 where the GPU supports it (fp16's speed, fp32's
                range), else float32

The step that gave finite frames is recorded in the sidecar (`precision`), and `reproduce`
regenerates with the same step. Every step restores the pipeline as loaded afterwards, so an
item's precision never depends on which items its worker ran before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

AS_LOADED = "as_loaded"
VAE_FP32 = "vae_fp32"
HINT = (
    "the pipeline produced NaN/inf or all-black frames, also with the VAE decode in float32 and the whole "
    "pipeline in {whole} (try model.dtype=float32, a larger size or a lower guidance scale)"
)


def whole_pipeline_step(device: torch.device) -> str:
    """The ladder's last step on `device`: bf16 where supported (CUDA), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def ladder(device: torch.device) -> tuple[str, ...]:
    return (AS_LOADED, VAE_FP32, whole_pipeline_step(device))


def all_black(videos: list[np.ndarray], dtype: torch.dtype) -> bool:
    """All frames of some video black (every pixel <= 2), from a half-precision pipeline: the
    fp16 hazard. A float32 pipeline's black video is what the model made, not an overflow."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    return any(int(video.max()) <= 2 for video in videos)


@contextmanager
def precision(pipe: Any, step: str | None) -> Iterator[None]:
    """The pipeline at ladder step `step` for the duration; restored afterwards."""
    if step in (None, AS_LOADED):
        yield
        return
    if step == VAE_FP32:
        vae_dtype = pipe.vae.dtype
        pipe.vae.to(dtype=torch.float32)
        plain = type(pipe).decode_latents

        def decode_latents(latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 14) -> torch.Tensor:
            return plain(pipe, latents.to(torch.float32), num_frames, decode_chunk_size)

        pipe.decode_latents = decode_latents
        try:
            yield
        finally:
            del pipe.decode_latents  # the class's own again
            pipe.vae.to(dtype=vae_dtype)
        return
    if step not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision step {step!r}")
    dtype = pipe.dtype
    pipe.to(dtype=torch.float32 if step == "fp32" else torch.bfloat16)
    try:
        yield
    finally:
        pipe.to(dtype=dtype)
