"""Measuring a video's quality signals (core/quality.py names them) from its uint8 frames.

numpy and OpenCV, no torch: the worker measures every item's frames before they are
encoded (engine/generation.py), and `svdbatch score` measures decoded video files
(reports/score.py) with the very same function, so a dataset made elsewhere can be filtered
the same way. Neither the CLI's start nor the driver imports this module (pyproject.toml's
import contracts).

Motion is the curation tools' measure (NeMo Curator's motion filter, EasyAnimate's and
CogVideoX's optical-flow score): OpenCV's Farneback dense optical flow between consecutive
frames, on a grey copy downscaled to FLOW_WIDTH pixels wide, its mean magnitude divided by
that width, so the same clip scores the same at any resolution (in % of the width per frame).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from svdbatch.core.quality import BLACK_LUMA, FLAT_STD, PSNR_CAP, WHITE_LUMA, Signals

FLOW_WIDTH = 128  # frames are downscaled to this width (never up) for the optical flow
# cv2.calcOpticalFlowFarneback(pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def _grey(frames: np.ndarray) -> list[np.ndarray]:
    return [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in frames]


def _small(grey: np.ndarray) -> np.ndarray:
    height, width = grey.shape
    if width <= FLOW_WIDTH:
        return grey
    size = (FLOW_WIDTH, max(1, round(height * FLOW_WIDTH / width)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def motion_per_pair(grey: list[np.ndarray]) -> list[float]:
    """Mean optical-flow magnitude of each consecutive pair, in % of the frame width."""
    small = [_small(g) for g in grey]
    width = small[0].shape[1] if small else 1
    out = []
    for prev, nxt in zip(small, small[1:], strict=False):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, *FARNEBACK)
        magnitude = np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2)
        out.append(100.0 * float(magnitude.mean()) / width)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images of one shape, capped at PSNR_CAP (identical)."""
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    if mse <= 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * float(np.log10(255.0**2 / mse)))


def as_rgb(image: Any, width: int, height: int) -> np.ndarray:
    """A conditioning image (PIL image or uint8 array) as uint8 RGB at the frames' size."""
    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = array[..., :3].astype(np.uint8, copy=False)
    if array.shape[:2] != (height, width):
        array = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA)
    return array


def measure(frames: np.ndarray, source: Any = None) -> Signals:
    """The signals of uint8 frames (F, H, W, 3); `source`: the conditioning image (PIL image
    or uint8 array, fitted to the frames' size if it differs) for first_frame_psnr."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[-1] < 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    frames = frames[..., :3]
    grey = _grey(frames)
    stats = [cv2.meanStdDev(g) for g in grey]
    means = [float(m[0][0]) / 255.0 for m, _ in stats]
    stds = [float(s[0][0]) / 255.0 for _, s in stats]
    pairs = motion_per_pair(grey)
    fidelity = None
    if source is not None:
        fidelity = psnr(frames[0], as_rgb(source, frames.shape[2], frames.shape[1]))
    return Signals(
        motion=round(float(np.mean(pairs)) if pairs else 0.0, 4),
        motion_max=round(max(pairs, default=0.0), 4),
        brightness_min=round(min(means), 4),
        brightness_max=round(max(means), 4),
        contrast_min=round(min(stds), 4),
        black_frames=sum(m < BLACK_LUMA for m in means),
        white_frames=sum(m > WHITE_LUMA for m in means),
        flat_frames=sum(s < FLAT_STD for s in stds),
        flicker=round(max((abs(b - a) for a, b in zip(means, means[1:], strict=False)), default=0.0), 4),
        first_frame_psnr=None if fidelity is None else round(fidelity, 3),
    )
