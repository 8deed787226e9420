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


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_animate_at_the_item_fps(tmp_path, one_row, fmt):
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", f"output={fmt}"))
    with Image.open(tmp_path / "run" / "videos" / f"a.{fmt}") as image:
        assert image.n_frames == 4 and image.info.get("loop") == 0
        image.seek(1)
        image.load()  # WebP reports a frame's duration once it is decoded
        assert image.info["duration"] == pytest.approx(1000 / 9, abs=10)  # GIF counts in centiseconds


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
