"""Output presets: mp4 is H.264/yuv420p at the generated size (plays in browsers), gif/webp
animate at the right rate, PNG frames are lossless; fps follows the item unless overridden."""

from __future__ import annotations

import json
import re
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from svdbatch.driver import run
from svdbatch.outputs import read_video
from svdbatch.runner import frames_sha256

from .conftest import make_cfg, write_csv


def probe(path) -> str:
    """ffmpeg's description of the first video stream (imageio-ffmpeg ships no ffprobe)."""
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return next(line for line in result.stderr.splitlines() if "Video:" in line)


@pytest.fixture
def one_row(tmp_path, images):
    return write_csv(tmp_path / "m.csv", ["id", "image", "fps"], [["a", "img/a.png", 9]])


def test_mp4_is_h264_yuv420p_at_the_generated_size_and_item_fps(tmp_path, one_row):
    # 72 is a multiple of 8 but not of 16: it must not be rescaled.
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", "conditioning.height=72"))
    stream = probe(tmp_path / "run" / "videos" / "a.mp4")
    assert "h264" in stream and "yuv420p" in stream and "64x72" in stream, stream
    assert re.search(r"\b9 fps\b", stream), stream
    assert read_video(tmp_path / "run" / "videos" / "a.mp4").shape == (4, 72, 64, 3)


def test_output_fps_overrides_the_items(tmp_path, one_row):
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", "output.fps=12"))
    assert re.search(r"\b12 fps\b", probe(tmp_path / "run" / "videos" / "a.mp4"))


# Mean absolute error (8-bit levels) a decoded frame may have against the lossless PNG frame:
# GIF quantises to a 256-colour palette, WebP is lossy at quality 8 (measured ~3 and ~8 on the
# tiny model's noisy frames, whose frames differ from each other by ~20).
TOLERANCE = {"gif": 6.0, "webp": 12.0}


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_hold_the_generated_frames_at_the_item_fps(tmp_path, one_row, fmt):
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'png'}", "output=frames"))
    reference = read_video(tmp_path / "png" / "videos" / "a").astype(int)  # the same item, lossless
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", f"output={fmt}"))
    path = tmp_path / "run" / "videos" / f"a.{fmt}"
    durations = []
    with Image.open(path) as image:
        assert image.n_frames == 4 and image.is_animated
        assert image.info.get("loop") == 0  # loops forever
        for index in range(image.n_frames):
            image.seek(index)
            image.load()  # WebP reports a frame's duration once it is decoded
            durations.append(image.info["duration"])
    # 9 fps from the row: 111 ms a frame (GIF counts in centiseconds: 110).
    assert durations == [pytest.approx(1000 / 9, abs=10)] * 4
    assert sum(durations) == pytest.approx(4 * 1000 / 9, abs=20)

    decoded = read_video(path).astype(int)
    assert decoded.shape == reference.shape == (4, 64, 64, 3)
    for index in range(4):
        errors = [np.abs(decoded[index] - reference[other]).mean() for other in range(4)]
        assert errors[index] < TOLERANCE[fmt], (index, errors)
        assert int(np.argmin(errors)) == index  # the frames are in order


def test_png_frames_are_lossless(tmp_path, one_row):
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", "output=frames"))
    frames = read_video(tmp_path / "run" / "videos" / "a")
    sidecar = json.loads((tmp_path / "run" / "items" / "a.json").read_text())
    assert frames.dtype == np.uint8 and frames.shape == (4, 64, 64, 3)
    assert frames_sha256(frames) == sidecar["frames_sha256"]  # exactly the generated frames


def test_quality_setting_changes_the_mp4(tmp_path, one_row):
    sizes = {}
    for quality in (2, 9):
        run_dir = tmp_path / f"q{quality}"
        run(make_cfg(f"manifest={one_row}", f"run.dir={run_dir}", f"output.quality={quality}"))
        sizes[quality] = (run_dir / "videos" / "a.mp4").stat().st_size
    assert sizes[9] > sizes[2]
