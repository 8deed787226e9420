"""The whole path on the tiny model: manifest -> plan -> worker -> store, and back again."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from svdbatch import run
from svdbatch.models.tiny import ensure_tiny_model
from svdbatch.rundir.outputs import read_video
from tests.conftest import make_cfg, write_csv

from .runfiles import failures_of, results_of, sidecar_file, video_file, video_rel


def results(run_dir: Path) -> dict[str, dict]:
    return {r["id"]: r for r in results_of(run_dir)}


def sidecar(run_dir: Path, item_id: str) -> dict:
    return json.loads((sidecar_file(run_dir, f"{item_id}")).read_text())


# What manifest4 + the FAST tiny config must reach the pipeline as, written out by hand from
# conf/conditioning/tiny.yaml, the FAST overrides and each row (not read back from a sidecar).
BASE_PARAMS = dict(
    width=64,
    height=64,
    num_frames=4,
    num_inference_steps=2,
    fps=7,
    motion_bucket_id=127,
    noise_aug_strength=0.02,
    min_guidance_scale=1.0,
    max_guidance_scale=3.0,
)
ROW_OVERRIDES = {"a": {}, "b": {"motion_bucket_id": 30}, "c": {"fps": 9}, "d": {"motion_bucket_id": 200, "fps": 5}}


def expected_seed(item_id: str) -> int:
    """manifest4's seeds; row c has none, so it gets sha256('svdbatch-seed:<run.seed>:<id>')."""
    explicit = {"a": 1, "b": 2, "d": 4}
    if item_id in explicit:
        return explicit[item_id]
    digest = hashlib.sha256(f"svdbatch-seed:0:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def test_frames_equal_a_plain_diffusers_call(tmp_path, manifest4):
    """The reference behaviour: pipe(image, generator=Generator('cpu').manual_seed(seed), **params),
    with the parameters and seeds the config and rows ask for, written out independently."""
    from diffusers import StableVideoDiffusionPipeline

    run_dir = tmp_path / "run"
    # stretch is what the diffusers guide does: image.resize((w, h)).
    summary = run(make_cfg(f"manifest={manifest4}", f"run.dir={run_dir}", "output=frames", "conditioning.resize=stretch"))
    assert (summary.done, summary.failed) == (4, 0)

    pipe = StableVideoDiffusionPipeline.from_pretrained(ensure_tiny_model())
    pipe.set_progress_bar_config(disable=True)
    for item_id in "abcd":
        params = {**BASE_PARAMS, **ROW_OVERRIDES[item_id]}
        image = Image.open(tmp_path / "img" / f"{item_id}.png").convert("RGB").resize((64, 64))
        # decode_chunk_size left at diffusers' default (all frames at once), as conditioning.decode_chunk_size=null means.
        expected = pipe(image, generator=torch.Generator("cpu").manual_seed(expected_seed(item_id)), **params).frames[0]
        got = read_video(video_file(run_dir, item_id, ""))
        assert got.shape == (4, 64, 64, 3)
        np.testing.assert_array_equal(got, np.stack([np.asarray(f) for f in expected]), err_msg=item_id)


def test_order_of_rows_does_not_change_any_item(tmp_path, images, manifest4):
    lines = manifest4.read_text().splitlines()
    reversed_manifest = tmp_path / "reversed.csv"
    reversed_manifest.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    run(make_cfg(f"manifest={manifest4}", f"run.dir={tmp_path / 'one'}"))
    run(make_cfg(f"manifest={reversed_manifest}", f"run.dir={tmp_path / 'two'}"))
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert {k: v["frames_sha256"] for k, v in one.items()} == {k: v["frames_sha256"] for k, v in two.items()}
    assert len(set(v["frames_sha256"] for v in one.values())) == 4


def test_sidecar_records_what_is_needed_to_reproduce(tmp_path, manifest4):
    from importlib import metadata

    from svdbatch.models.tiny import weights_fingerprint

    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest4}", f"run.dir={run_dir}")
    run(cfg)
    for item_id in "abcd":
        record = sidecar(run_dir, item_id)
        assert record["status"] == "done" and record["id"] == item_id
        assert record["seed"] == expected_seed(item_id)
        assert record["params"] == {**BASE_PARAMS, **ROW_OVERRIDES[item_id], "decode_chunk_size": 4}
        image_file = tmp_path / "img" / f"{item_id}.png"
        assert record["image"]["sha256"] == hashlib.sha256(image_file.read_bytes()).hexdigest()
        assert record["image"]["size"] == [80, 64]  # the source before fitting (conftest images are 80x64)
        assert record["row"]["id"] == item_id and record["row"]["seed_derived"] is (item_id == "c")
        assert record["row"]["overrides"] == ROW_OVERRIDES[item_id]
        assert record["preprocess"]["resize"] == "crop"
        video = run_dir / record["output"]["path"]
        output = dict(record["output"])
        encoder, settings = output.pop("encoder"), output.pop("settings")
        assert output == {
            "path": video_rel(run_dir, item_id),
            "format": "mp4",
            "fps": record["params"]["fps"],
            "bytes": video.stat().st_size,
            "sha256": hashlib.sha256(video.read_bytes()).hexdigest(),
            "frames": 4,
            "height": 64,
            "width": 64,
        }
        assert (encoder["name"], encoder["pix_fmt"]) == ("libx264", "yuv420p")
        assert settings["format"] == "mp4" and settings["fps"] == record["params"]["fps"]
        timings = record["timings"]
        assert timings["total_s"] == pytest.approx(timings["load_image_s"] + timings["generate_s"] + timings["write_s"])
    record = sidecar(run_dir, "b")
    assert record["model"] == {
        "name": "tiny",
        "source": "tiny",
        "revision": None,
        "variant": None,
        "dtype": "float32",
        "fingerprint": weights_fingerprint(ensure_tiny_model()),
    }
    for package in ("torch", "diffusers", "transformers", "numpy", "svdbatch"):
        assert record["versions"][package] == metadata.version(package), package
    assert record["device"] == "cpu" and record["num_threads"] == torch.get_num_threads()
    assert record["compiled"] is False
    assert record["config"] == OmegaConf.to_container(cfg, resolve=True)
    assert (run_dir / "config.yaml").is_file()


def test_resume_skips_done_items_and_redoes_changed_or_deleted_ones(tmp_path, images):
    manifest = write_csv(
        tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2], ["c", "img/c.png", 3]]
    )
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")
    assert run(cfg).done == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "videos").glob("*/*")}

    again = run(cfg)
    assert (again.done, again.skipped) == (0, 3)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (run_dir / "videos").glob("*/*")}

    write_csv(manifest, ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 99], ["c", "img/c.png", 3]])
    (video_file(run_dir, "c", ".mp4")).unlink()
    changed = run(cfg)
    assert (changed.done, changed.skipped) == (2, 1)
    assert sidecar(run_dir, "b")["seed"] == 99

    # A changed conditioning value changes every key.
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "conditioning.fps=6")).done == 3
    # ...and so does a changed source image.
    images["a"].write_bytes(images["d"].read_bytes())
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "conditioning.fps=6")).done == 1


def test_leftovers_of_a_killed_run_are_never_taken_as_done(tmp_path, manifest4):
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest4}", f"run.dir={run_dir}")
    run(cfg)
    # Killed while encoding a: a stale temporary next to a video that was never renamed in.
    old = time.time() - 3600
    stale = video_file(run_dir, "a").with_name(".a.partial-x1y2.mp4")
    stale.write_bytes(b"\x00" * 10)
    os.utime(stale, (old, old))
    (sidecar_file(run_dir, "a")).unlink()  # the sidecar (commit marker) never landed
    (video_file(run_dir, "a", ".mp4")).write_bytes(b"half a video")
    # Killed after the sidecar of d, before its results line.
    (records_file,) = (run_dir / "records").glob("*.results.jsonl")
    kept = [line for line in records_file.read_text().splitlines(keepends=True) if '"id": "d"' not in line]
    records_file.write_text("".join(kept))
    # Killed while appending a results line: a torn last line.
    with records_file.open("ab") as handle:
        handle.write(b'{"id": "b", "key": "tor')
    # A truncated video of c behind a complete sidecar.
    video_c = video_file(run_dir, "c", ".mp4")
    video_c.write_bytes(video_c.read_bytes()[:100])

    summary = run(cfg)
    assert (summary.done, summary.skipped) == (2, 2)  # a and c redone; b and d kept
    assert not stale.exists()
    lines = records_file.read_text().splitlines()
    assert lines[-1] != '{"id": "b", "key": "tor' and all(json.loads(line) for line in lines if "tor" not in line)
    assert sorted(results(run_dir)) == ["a", "b", "c", "d"]
    for item_id in "abcd":
        frames = read_video(video_file(run_dir, item_id))
        assert frames.shape == (4, 64, 64, 3)


def test_a_failing_item_is_recorded_and_the_batch_goes_on(tmp_path, images):
    (tmp_path / "img" / "broken.png").write_bytes(images["a"].read_bytes()[:60])
    manifest = write_csv(
        tmp_path / "m.csv", ["id", "image"], [["a", "img/a.png"], ["broken", "img/broken.png"], ["b", "img/b.png"]]
    )
    run_dir = tmp_path / "run"
    summary = run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.check_images=false"))
    assert (summary.done, summary.failed) == (2, 1) and not summary.ok
    (failure,) = failures_of(run_dir)
    assert failure["id"] == "broken" and failure["line"] == 3
    assert "Traceback" in failure["traceback"] and failure["error"]
    assert not (sidecar_file(run_dir, "broken")).exists()


def test_not_strict_runs_good_rows_and_records_bad_ones(tmp_path, images):
    manifest = write_csv(
        tmp_path / "m.csv", ["id", "image", "motion_bucket_id"], [["a", "img/a.png", 1], ["b", "img/b.png", 999]]
    )
    run_dir = tmp_path / "run"
    summary = run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.strict=false"))
    assert (summary.done, summary.invalid) == (1, 1) and not summary.ok
    (failure,) = failures_of(run_dir)
    assert failure["id"] == "b" and "motion_bucket_id" in failure["problems"][0]
