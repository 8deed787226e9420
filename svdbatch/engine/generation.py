"""Frames from a loaded pipeline: the call itself (generate_frames, one generator per item
from its own seed, as a user calls diffusers by hand; `svdbatch reproduce` shares it) and the
ladders around it that a worker climbs: giving up between steps once the run abandons the
items in flight, stepping down the memory ladder after an out-of-memory error, up the
precision ladder after NaN/inf frames, and generating a dud again (quality.max_attempts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from svdbatch.core.faults import fault_point
from svdbatch.core.measure import measure
from svdbatch.core.outcomes import Outcome
from svdbatch.core.params import GenParams
from svdbatch.core.quality import QualityConfig, attempt_seed, redoes, rules, verdict
from svdbatch.engine.plan import PlannedItem
from svdbatch.engine.stops import Interrupted
from svdbatch.models.loading import LoadedPipeline, lower_memory
from svdbatch.models.rescue import AS_LOADED, HINT, all_black, ladder, precision
from svdbatch.rundir.claims import Claim
from svdbatch.rundir.sidecar_fields import Attempt, SidecarQuality

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    pass


class NonFiniteFrames(GenerationError):
    """The pipeline's output holds NaN/inf (an fp16 overflow): the rescue ladder's cue."""


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Same quantisation as diffusers' numpy_to_pil (round, not truncate), so PNG frames
    written by svdbatch equal `pipe(...).frames[0]` as PIL images."""
    return (frames * 255).round().astype(np.uint8)


@dataclass
class Loaded:
    """A batch entry whose source image is ready (or failed to load)."""

    entry: PlannedItem
    image: Any = None
    source_size: tuple[int, int] | None = None
    load_s: float = 0.0
    error: BaseException | None = None
    error_trace: str = ""
    claim: Claim | None = None  # this process's claim on the item (store.claim)
    settled: Outcome | None = None  # nothing to generate: busy, done elsewhere or stopped


@dataclass
class Generated:
    ready: Loaded
    frames: np.ndarray
    generate_s: float
    params: GenParams  # as actually generated (an OOM fallback may lower decode_chunk_size)
    oom_fallback: list[str] = field(default_factory=list)
    quality: SidecarQuality | None = None  # the attempts; `frames` are the kept one's (None: not judged yet)
    precision: str = AS_LOADED  # the NaN-rescue step that gave these frames (models/rescue.py)


def generate_frames(
    pipe: Any, images: list, params: GenParams, seeds: list[int], on_step: Callable | None = None
) -> list[np.ndarray]:
    """uint8 frames (F, H, W, 3) per image; one generator per image, from its own seed.
    `on_step` is diffusers' callback_on_step_end (it must return the latents untouched)."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    fault_point("generate")
    single = len(images) == 1  # exactly the call a user makes by hand
    output = pipe(
        images[0] if single else images,
        generator=generators[0] if single else generators,
        output_type="np",
        **params.as_dict(),
        **({"callback_on_step_end": on_step} if on_step is not None else {}),
    )
    videos = []
    for frames in output.frames:
        frames = np.asarray(frames)
        if fault_point("frames") == "nan":  # tests: an fp16 overflow, on demand
            frames = np.full_like(frames, np.nan, dtype=np.float32)
        if not np.isfinite(frames).all():
            raise NonFiniteFrames("the pipeline produced NaN/inf frames (try float32 or a lower guidance scale)")
        videos.append(to_uint8(frames))
    return videos


def load_blank(width: int, height: int) -> Image.Image:
    from PIL import Image

    return Image.new("RGB", (width, height), (127, 127, 127))


class FrameGenerator:
    """A loaded pipeline and the ladders around its call (the Worker is one, with a run dir)."""

    def __init__(self, loaded: LoadedPipeline, retry_on_oom: bool = False, quality: QualityConfig | None = None):
        self.loaded = loaded
        self.quality = quality or QualityConfig()
        self.retry_on_oom = retry_on_oom
        # Set by Worker.run(): true once the items in flight must be given up (stops.StopRequest).
        self.abandon: Callable[[], bool] | None = None

    def generate(self, images: list, params: GenParams, seeds: list[int]) -> list[np.ndarray]:
        """uint8 frames (F, H, W, 3) per image (generate_frames), giving up between
        denoising steps once the run abandons the items in flight."""
        return generate_frames(self.loaded.pipe, images, params, seeds, self.check_abandon if self.abandon is not None else None)

    def check_abandon(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if self.abandon is not None and self.abandon():
            raise Interrupted()  # not an item failure: the item is left for the next run
        return tensors

    def judge(self, first: Generated) -> Generated:
        """Measure the item's frames (core/measure.py) and judge them by the quality rules;
        a dud is generated again with attempt_seed(row seed, n) up to quality.max_attempts.
        Keeps the attempt that breaks the fewest rules (the earliest of equals), so the kept
        frames depend only on the row, the config and the software. Without redoes it only
        measures and judges (the writer thread does that: no generation)."""
        ready, seed = first.ready, first.ready.entry.item.seed
        limit = int(self.quality.max_attempts) if redoes(self.quality) else 1
        kept, generate_s = first, first.generate_s
        signals = measure(first.frames, ready.image).as_dict()
        attempts = [Attempt(0, seed, signals, verdict(signals, self.quality), first.precision)]
        while attempts[-1].verdict and len(attempts) < limit:
            number = len(attempts)
            redo_seed = attempt_seed(seed, number)
            log.info(
                "item %s is a dud (%s): attempt %d with seed %d",
                ready.entry.item.id,
                "; ".join(attempts[-1].verdict),
                number + 1,
                redo_seed,
            )
            start = time.perf_counter()
            (frames,), used, fallback, step = self.generate_rescued([ready.image], ready.entry.params, [redo_seed])
            generate_s += time.perf_counter() - start
            signals = measure(frames, ready.image).as_dict()
            attempts.append(Attempt(number, redo_seed, signals, verdict(signals, self.quality), step))
            best = min(range(len(attempts)), key=lambda n: (len(attempts[n].verdict), n))
            if best == number:
                kept = Generated(ready, frames, 0.0, used, first.oom_fallback + fallback, precision=step)
        best = min(range(len(attempts)), key=lambda n: (len(attempts[n].verdict), n))
        settings = {f"{bound}_{signal}": value for (signal, bound), value in sorted(rules(self.quality).items())}
        quality = SidecarQuality(attempts, best, bool(attempts[best].verdict), {**settings, "max_attempts": limit})
        return replace(kept, generate_s=generate_s, quality=quality)

    def generate_rescued(
        self, images: list, params: GenParams, seeds: list[int]
    ) -> tuple[list[np.ndarray], GenParams, list[str], str]:
        """generate_with_fallback, and when it yields NaN/inf (or, from a half-precision
        pipeline, all-black) frames, again one step up the rescue ladder (models/rescue.py):
        the VAE decode in float32, then the whole pipeline in bf16/fp32. Returns the step
        used too; fails with the hint once every step did."""
        steps = ladder(self.loaded.device)
        for number, step in enumerate(steps):
            try:
                with precision(self.loaded.pipe, step):
                    videos, used, fallback = self.generate_with_fallback(images, params, seeds)
                if not all_black(videos, self.loaded.dtype):
                    return videos, used, fallback, step
                why = "all-black frames"
            except NonFiniteFrames:
                why = "NaN/inf frames"
            if number + 1 < len(steps):
                log.warning("%s at precision %s; retrying with %s", why, step, steps[number + 1])
        raise GenerationError(HINT.format(whole=steps[-1]))

    def generate_with_fallback(
        self, images: list, params: GenParams, seeds: list[int]
    ) -> tuple[list[np.ndarray], GenParams, list[str]]:
        """generate(), and with run.retry_on_oom, after an out-of-memory error step the
        pipeline down the memory ladder (models.lower_memory) and try again. The worker
        stays lowered: the next item would most likely run out of memory too."""
        steps: list[str] = []
        while True:
            used = self.effective_params(params)
            try:
                return self.generate(images, used, seeds), used, steps
            except torch.OutOfMemoryError as exc:
                step = lower_memory(self.loaded, used.decode_chunk_size) if self.retry_on_oom else None
                if step is None:
                    raise
                log.warning("out of memory (%s); retrying with %s", str(exc).splitlines()[0], step)
                steps.append(step)

    def effective_params(self, params: GenParams) -> GenParams:
        cap = self.loaded.decode_cap
        if cap is None or params.decode_chunk_size <= cap:
            return params
        return replace(params, decode_chunk_size=cap)
