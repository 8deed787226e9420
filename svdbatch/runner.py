"""A worker owns one loaded pipeline and turns planned items into frames.

The generator is created per item from the item's own seed, exactly as a user would call
diffusers by hand, so an item's frames do not depend on which worker runs it or when.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

import numpy as np
import torch

from .images import load_rgb, prepare
from .models import LoadedPipeline
from .params import GenParams
from .schedule import PlannedItem


class GenerationError(RuntimeError):
    pass


@dataclass
class Generated:
    frames: np.ndarray  # uint8 (F, H, W, 3)
    source_size: tuple[int, int]
    timings: dict[str, float]

    @property
    def frames_sha256(self) -> str:
        return frames_sha256(self.frames)


def frames_sha256(frames: np.ndarray) -> str:
    digest = hashlib.sha256(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Same quantisation as diffusers' numpy_to_pil (round, not truncate), so PNG frames
    written by svdbatch equal `pipe(...).frames[0]` as PIL images."""
    return (frames * 255).round().astype(np.uint8)


def pipeline_kwargs(params: GenParams) -> dict[str, Any]:
    return params.as_dict()


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("svdbatch", "torch", "diffusers", "transformers", "accelerate", "numpy", "pillow", "imageio-ffmpeg"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class Worker:
    def __init__(self, loaded: LoadedPipeline, num_threads: Optional[int] = None, step_progress: bool = False):
        if num_threads:
            # The intra-op thread count changes float results, so it is fixed per worker
            # and recorded in every sidecar.
            torch.set_num_threads(num_threads)
        self.loaded = loaded
        self.loaded.pipe.set_progress_bar_config(disable=not step_progress, leave=False)

    def environment(self) -> dict[str, Any]:
        device = self.loaded.device
        return {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "num_threads": torch.get_num_threads(),
            "compiled": self.loaded.compiled,
            "versions": software_versions(),
        }

    def generate(self, image, params: GenParams, seed: int) -> np.ndarray:
        """Frames for one prepared PIL image, as uint8 (F, H, W, 3)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        output = self.loaded.pipe(image, generator=generator, output_type="np", **pipeline_kwargs(params))
        frames = np.asarray(output.frames[0])
        if not np.isfinite(frames).all():
            raise GenerationError("the pipeline produced NaN/inf frames (try float32 or a lower guidance scale)")
        return to_uint8(frames)

    def run(self, planned: PlannedItem) -> Generated:
        start = time.perf_counter()
        source = load_rgb(planned.item.image)
        image = prepare(source, planned.params.width, planned.params.height)
        loaded_at = time.perf_counter()
        frames = self.generate(image, planned.params, planned.item.seed)
        done_at = time.perf_counter()
        return Generated(
            frames=frames,
            source_size=source.size,
            timings={"load_image_s": loaded_at - start, "generate_s": done_at - loaded_at},
        )
