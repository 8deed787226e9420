"""Real-world source images: EXIF orientation, alpha, odd modes, aspect ratios, resize policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from svdbatch import run
from svdbatch.core.params import Preprocess, check_conditioning, parse_color
from svdbatch.inputs.images import ImageProblem, load_rgb, prepare
from svdbatch.models.tiny import ensure_tiny_model
from svdbatch.rundir.outputs import read_video
from tests.conftest import make_cfg, make_image, write_csv

from .runfiles import failures_of, sidecar_file, video_file

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def stripes(size, vertical=True) -> Image.Image:
    """Three equal bands red | green | blue (left to right, or top to bottom)."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    for index, colour in enumerate((RED, GREEN, BLUE)):
        if vertical:
            array[:, index * width // 3 : (index + 1) * width // 3] = colour
        else:
            array[index * height // 3 : (index + 1) * height // 3, :] = colour
    return Image.fromarray(array)


@pytest.mark.parametrize("vertical", [True, False], ids=["wide", "tall"])
def test_crop_keeps_the_centre_pad_keeps_everything_stretch_distorts(vertical):
    size = (192, 64) if vertical else (64, 192)
    image = stripes(size, vertical)

    cropped = np.asarray(prepare(image, 64, 64, "crop"))
    assert cropped.shape == (64, 64, 3)
    assert (cropped == GREEN).all()  # exactly the middle band

    padded = np.asarray(prepare(image, 64, 64, "pad", pad_color=(9, 9, 9)))
    # The 3:1 image shrinks to about 64x21 in the middle; the rest is the letterbox colour.
    border = padded[:10] if vertical else padded[:, :10]
    assert (border == 9).all()
    middle = padded[32] if vertical else padded[:, 32]
    assert {tuple(middle[2]), tuple(middle[32]), tuple(middle[-3])} == {RED, GREEN, BLUE}

    stretched = np.asarray(prepare(image, 64, 64, "stretch"))
    assert tuple(stretched[2, 2]) == RED and tuple(stretched[32, 32]) == GREEN and tuple(stretched[-3, -3]) == BLUE


def test_upscales_small_images_and_none_requires_the_exact_size():
    small = stripes((30, 10))
    for mode in ("crop", "pad", "stretch"):
        assert prepare(small, 64, 48, mode).size == (64, 48)
    exact = stripes((64, 48))
    assert prepare(exact, 64, 48, "none") is exact
    with pytest.raises(ImageProblem, match="30x10 but conditioning.resize=none needs exactly 64x48"):
        prepare(small, 64, 48, "none")


def test_exif_orientation_is_honoured(tmp_path):
    raw = stripes((90, 30))  # red band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phone cameras write
    raw.save(tmp_path / "phone.png", exif=exif)
    shown = load_rgb(tmp_path / "phone.png")
    assert shown.size == (30, 90)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))
    assert tuple(np.asarray(shown)[2, 15]) == RED  # the left band is now on top


def test_alpha_is_composited_onto_the_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 4:, 3] = 255  # right half opaque, left half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    for name in ("a.png", "la.png"):
        out = np.asarray(load_rgb(tmp_path / name, background=parse_color("#00ff00")))
        assert (out[:, :4] == GREEN).all() and (out[:, 4:] == 200).all()
    # A palette image with a transparent index.
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png", background=(1, 2, 3)))
    assert tuple(out[0, 0]) == (1, 2, 3) and tuple(out[0, 1]) == (40, 50, 60)


def test_greyscale_palette_16bit_and_cmyk_become_8bit_rgb(tmp_path):
    Image.fromarray(np.full((4, 4), 77, np.uint8), "L").save(tmp_path / "l.png")
    assert (np.asarray(load_rgb(tmp_path / "l.png")) == 77).all()

    Image.new("RGB", (4, 4), (12, 34, 56)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.gif")
    out = load_rgb(tmp_path / "p.gif")
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (12, 34, 56)

    sixteen = np.array([[0, 32768, 65535, 1000]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))[0, :, 0]
    assert list(out) == [0, 128, 255, 3]  # the high byte: scaled, not clipped to white

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = load_rgb(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[0, 0].astype(int)
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 1, 1, 0) is red


def test_bad_colours_are_config_errors():
    problems = check_conditioning(make_cfg("conditioning.pad_color=notacolour", "conditioning.background='#00ff00'").conditioning)
    assert len(problems) == 1 and problems[0].startswith("conditioning.pad_color: not a colour")
    assert Preprocess.from_config(make_cfg("conditioning.resize=pad").conditioning).resize.value == "pad"


def test_crop_is_the_default_and_equals_diffusers_on_the_centre_crop(tmp_path, images):
    """80x64 sources, 64x64 target: crop must give exactly pipe(image.crop(centre 64x64));
    a row's own `resize` column beats the config."""
    from diffusers import StableVideoDiffusionPipeline

    manifest = write_csv(
        tmp_path / "m.csv", ["id", "image", "seed", "resize"], [["a", "img/a.png", 1, None], ["b", "img/b.png", 2, "stretch"]]
    )
    run_dir = tmp_path / "run"
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "output=frames")).done == 2
    pipe = StableVideoDiffusionPipeline.from_pretrained(ensure_tiny_model())
    pipe.set_progress_bar_config(disable=True)
    for item_id, resize, fitted in [
        ("a", "crop", lambda im: im.crop((8, 0, 72, 64))),
        ("b", "stretch", lambda im: im.resize((64, 64))),
    ]:
        record = json.loads((sidecar_file(run_dir, f"{item_id}")).read_text())
        assert record["image"]["size"] == [80, 64] and record["preprocess"]["resize"] == resize
        image = fitted(Image.open(images[item_id]).convert("RGB"))
        expected = pipe(image, generator=torch.Generator("cpu").manual_seed(record["seed"]), **record["params"]).frames[0]
        np.testing.assert_array_equal(read_video(video_file(run_dir, item_id, "")), np.stack([np.asarray(f) for f in expected]))
    crop_frames = json.loads((sidecar_file(run_dir, "a")).read_text())["frames_sha256"]

    # The policy is part of the key: switching the config to pad redoes a (not b, which says stretch).
    padded = run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "output=frames", "conditioning.resize=pad"))
    assert (padded.done, padded.skipped) == (1, 1)
    record = json.loads((sidecar_file(run_dir, "a")).read_text())
    assert record["preprocess"]["resize"] == "pad" and record["frames_sha256"] != crop_frames


def test_a_messy_set_of_modes_and_shapes_runs_end_to_end(tmp_path):
    img = tmp_path / "img"
    make_image(img / "wide.png", size=(200, 50), seed=1)
    make_image(img / "tall.jpg", size=(40, 120), seed=2, mode="CMYK")
    Image.fromarray(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12).save(img / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    Image.open(make_image(img / "r.png", size=(100, 60), seed=3, mode="RGBA")).save(img / "rotated.png", exif=exif)
    manifest = write_csv(
        tmp_path / "m.csv",
        ["id", "image"],
        [[n, f"img/{n}.{e}"] for n, e in [("wide", "png"), ("tall", "jpg"), ("deep", "png"), ("rotated", "png")]],
    )
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "conditioning.resize=pad", "conditioning.pad_color='#336699'")
    summary = run(cfg)
    assert (summary.done, summary.failed) == (4, 0)
    sidecars = {p.stem: json.loads(p.read_text()) for p in (run_dir / "items").glob("*/*.json")}
    sizes = {item_id: record["image"]["size"] for item_id, record in sidecars.items()}
    assert sizes == {"wide": [200, 50], "tall": [40, 120], "deep": [80, 64], "rotated": [60, 100]}
    assert sidecars["wide"]["preprocess"]["pad_color"] == [0x33, 0x66, 0x99]
    frames = read_video(video_file(run_dir, "wide", ".mp4"))
    assert frames.shape == (4, 64, 64, 3)


def test_resize_none_fails_only_the_items_of_another_size(tmp_path):
    make_image(tmp_path / "img" / "fits.png", size=(64, 64))
    make_image(tmp_path / "img" / "other.png", size=(80, 64))
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["img/fits.png"], ["img/other.png"]])
    run_dir = tmp_path / "run"
    summary = run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "conditioning.resize=none"))
    assert (summary.done, summary.failed) == (1, 1)
    (failure,) = failures_of(run_dir)
    assert failure["id"] == "img__other" and "80x64 but conditioning.resize=none needs exactly 64x64" in failure["error"]
