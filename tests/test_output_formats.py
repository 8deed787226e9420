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

from svdbatch import run
from svdbatch.core.config import OutputConfig, OutputFormat
from svdbatch.rundir.outputs import (
    EncoderError,
    OutputCheckError,
    frames_sha256,
    output_bytes,
    output_name,
    output_sha256,
    read_video,
    shown_frames,
    write_video,
)

from .conftest import make_cfg, run_cli, write_csv
from .runfiles import sidecar_file, video_file, video_rel


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
    stream = probe(video_file(tmp_path / "run", "a", ".mp4"))
    assert "h264" in stream and "yuv420p" in stream and "64x72" in stream, stream
    assert re.search(r"\b9 fps\b", stream), stream
    assert read_video(video_file(tmp_path / "run", "a", ".mp4")).shape == (4, 72, 64, 3)


def test_output_fps_overrides_the_items(tmp_path, one_row):
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", "output.fps=12"))
    assert re.search(r"\b12 fps\b", probe(video_file(tmp_path / "run", "a", ".mp4")))


# Mean absolute error (8-bit levels) a decoded frame may have against the lossless PNG frame:
# GIF quantises to a 256-colour palette, WebP is lossy at quality 8 (measured ~3 and ~8 on the
# tiny model's noisy frames, whose frames differ from each other by ~20).
TOLERANCE = {"gif": 6.0, "webp": 12.0}


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_hold_the_generated_frames_at_the_item_fps(tmp_path, one_row, fmt):
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'png'}", "output=frames"))
    reference = read_video(video_file(tmp_path / "png", "a", "")).astype(int)  # the same item, lossless
    run(make_cfg(f"manifest={one_row}", f"run.dir={tmp_path / 'run'}", f"output={fmt}"))
    path = video_file(tmp_path / "run", "a", f".{fmt}")
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
    frames = read_video(video_file(tmp_path / "run", "a", ""))
    sidecar = json.loads((sidecar_file(tmp_path / "run", "a")).read_text())
    assert frames.dtype == np.uint8 and frames.shape == (4, 64, 64, 3)
    assert frames_sha256(frames) == sidecar["frames_sha256"]  # exactly the generated frames


def test_quality_setting_changes_the_mp4(tmp_path, one_row):
    sizes = {}
    for quality in (2, 9):
        run_dir = tmp_path / f"q{quality}"
        run(make_cfg(f"manifest={one_row}", f"run.dir={run_dir}", f"output.quality={quality}"))
        sizes[quality] = (video_file(run_dir, "a", ".mp4")).stat().st_size
    assert sizes[9] > sizes[2]


# -- every written file is checked, and the encoder is pinned ----------------------------
def noise(frames=4, height=64, width=64) -> np.ndarray:
    frames = np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    frames[2] = frames[1]  # a still moment: GIF/WebP writers merge equal frames, the check must not mind
    return frames


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp", "frames"])
def test_write_video_returns_what_the_sidecar_records(tmp_path, fmt):
    target = tmp_path / output_name("x", fmt)
    written = write_video(noise(), target, OutputConfig(format=OutputFormat(fmt)), fps=7)
    assert written.bytes == output_bytes(target) and written.sha256 == output_sha256(target)
    decoded = read_video(target)
    if fmt in ("gif", "webp"):  # the two equal frames are stored once, shown twice as long
        assert decoded.shape == (3, 64, 64, 3) and shown_frames(target, 7) == 4
    else:
        assert decoded.shape == (4, 64, 64, 3)
    assert written.encoder["name"] == {"mp4": "libx264", "gif": "pillow-gif", "webp": "pillow-webp", "frames": "pillow-png"}[fmt]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left


def test_mp4_encoder_is_named_not_probed(tmp_path, monkeypatch):
    # imageio-ffmpeg picks "the best H.264 encoder" with a probe that a Ctrl-C can break,
    # falling back to another encoder; svdbatch must never ask it.
    def probe_fails():
        raise RuntimeError("probe interrupted")

    monkeypatch.setattr("imageio_ffmpeg._io.get_first_available_h264_encoder", probe_fails)
    write_video(noise(), tmp_path / "x.mp4", OutputConfig(), fps=7)
    stream = probe(tmp_path / "x.mp4")
    assert "h264" in stream and "yuv420p" in stream, stream


def test_an_encoder_error_fails_the_write_and_leaves_nothing(tmp_path):
    # ffmpeg refuses a negative frame rate (exit status 1, nothing usable written): the run
    # validates output.fps up front, this is the encoder path behind it.
    with pytest.raises(EncoderError, match="ffmpeg exited with status"):
        write_video(noise(), tmp_path / "x.mp4", OutputConfig(), fps=-1)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_does_not_decode_never_gets_its_name(tmp_path, monkeypatch):
    # An encoder that "succeeds" but writes a torn file, like ffmpeg on a full disk used to.
    good = tmp_path / "good.mp4"
    write_video(noise(), good, OutputConfig(), fps=7)

    def torn(frames, target, fps, settings):
        target.write_bytes(good.read_bytes()[:4096])

    monkeypatch.setattr("svdbatch.rundir.outputs.encode_mp4", torn)
    with pytest.raises(OutputCheckError, match="does not decode|decodes to"):
        write_video(noise(), tmp_path / "x.mp4", OutputConfig(), fps=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mp4"]


def test_invalid_output_settings_are_refused_before_anything_runs(tmp_path, one_row):
    result = run_cli("validate", f"manifest={one_row}", "output.fps=-1", "output.quality=11")
    assert result.returncode == 2
    # Each setting is checked once (core/config_checks.check_run_and_output), so it is reported once.
    assert result.stderr.count("output.fps:") == 1 and "output.fps: must be in [1, 1000] or null, got -1" in result.stderr
    assert result.stderr.count("output.quality:") == 1 and "output.quality: must be in [0, 10], got 11" in result.stderr


def test_changing_output_settings_redoes_the_items_and_only_those_that_shape_the_file(tmp_path, one_row):
    run_dir = tmp_path / "run"
    base = [f"manifest={one_row}", f"run.dir={run_dir}"]
    assert run(make_cfg(*base)).done == 1
    assert run(make_cfg(*base, "output.loop=3")).skipped == 1  # a loop count does not touch an mp4
    assert run(make_cfg(*base, "output.quality=9")).done == 1
    first = json.loads((sidecar_file(run_dir, "a")).read_text())
    assert first["output"]["settings"]["crf"] == 5 and first["output"]["encoder"]["name"] == "libx264"
    assert run(make_cfg(*base, "output=gif")).done == 1
    sidecar = json.loads((sidecar_file(run_dir, "a")).read_text())
    assert sidecar["output"]["path"] == video_rel(run_dir, "a", ".gif") and sidecar["frames_sha256"] == first["frames_sha256"]
    assert [json.loads(line)["file_name"] for line in (run_dir / "metadata.jsonl").read_text().splitlines()] == [
        video_rel(run_dir, "a", ".gif")
    ]
    assert run(make_cfg(*base, "output=gif")).skipped == 1
    # verify: intact, and it would say if config.yaml claimed settings the file was not written with.
    from svdbatch.rundir.verify import verify_run_dir

    (report,) = verify_run_dir(run_dir)
    assert not report.problems and not report.notes
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("format: gif", "format: mp4"))
    (report,) = verify_run_dir(run_dir)
    assert not report.problems and "other output settings than config.yaml states" in report.notes[0]
