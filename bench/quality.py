"""Cost of the quality signals (core/measure.py) per item, as a share of an item's time.

Measures `measure(frames, source)` on 1024x576x25 uint8 frames that are random but smooth
(low-frequency noise drifting a few pixels per frame, like a real clip: Farneback works on
it as on video) and prints the median, its parts (grey + statistics, optical flow, first
frame PSNR), and the share of a GPU item's time at that size:

    SVD-XT, 1024x576, 25 frames, 25 steps: ~22.6 s per video on one A100 80GB (fp16,
    diffusers, the figure published for the model; --gpu-item-s to use another, e.g. what
    bench/gpu.py measured)

With redoes on (quality.max_attempts > 1) the signals run on the worker's main thread while
the GPU waits, so this share is what measuring adds to a GPU item at most; without redoes the
writer thread measures while the next batch generates.

    python bench/quality.py [--repeats 7] [--frames 25] [--width 1024] [--height 576] [--gpu-item-s 22.6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cv2
import numpy as np

from svdbatch.core.measure import _grey, measure, motion_per_pair, psnr

A100_SVD_XT_ITEM_S = 22.6  # s per 1024x576x25 video, 25 steps, fp16, one A100 (published figure)


def smooth_frames(frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 (F, H, W, 3): low-frequency noise (upscaled from 1/16 size), drifting 3 px/frame."""
    rng = np.random.default_rng(seed)
    pad = 3 * frames + 16
    coarse = rng.integers(0, 256, ((height + pad) // 16 + 1, (width + pad) // 16 + 1, 3), dtype=np.uint8)
    big = cv2.resize(coarse, (coarse.shape[1] * 16, coarse.shape[0] * 16), interpolation=cv2.INTER_CUBIC)
    return np.stack([big[3 * i : 3 * i + height, 3 * i : 3 * i + width] for i in range(frames)])


def median_s(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--gpu-item-s", type=float, default=A100_SVD_XT_ITEM_S, help="GPU seconds per item to compare with")
    options = parser.parse_args()
    frames = smooth_frames(options.frames, options.width, options.height)
    source = frames[0].copy()
    measure(frames, source)  # warm-up: OpenCV's first call allocates
    total = median_s(lambda: measure(frames, source), options.repeats)
    grey = _grey(frames)
    parts = {
        "grey + mean/std per frame": median_s(lambda: [cv2.meanStdDev(g) for g in _grey(frames)], options.repeats),
        "optical flow (Farneback, 128 px wide)": median_s(lambda: motion_per_pair(grey), options.repeats),
        "first-frame PSNR": median_s(lambda: psnr(frames[0], source), options.repeats),
    }
    signals = measure(frames, source)
    print(
        f"{options.frames} frames of {options.width}x{options.height}, cv2 {cv2.__version__}, "
        f"{cv2.getNumThreads()} OpenCV threads, {os.cpu_count()} CPUs; median of {options.repeats}"
    )
    print(f"signals per item      {1000 * total:8.1f} ms   (motion {signals.motion:.3f} % width/frame)")
    for name, seconds in parts.items():
        print(f"  {name:<36}{1000 * seconds:8.1f} ms")
    share = 100 * total / options.gpu_item_s
    print(f"share of a GPU item   {share:8.2f} %   of {options.gpu_item_s:g} s (target <= 2 %)")


if __name__ == "__main__":
    main()
