"""Restarts that read no image: header checks by default, a cache of checks and hashes in the
run dir by (path, size, mtime), image checks per shard, and status from the run's summary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import svdbatch
import svdbatch.inputs.images
import svdbatch.reports.status
from svdbatch import run
from svdbatch.core.config import ImageCheck, image_check_mode
from svdbatch.core.errors import ConfigError, ManifestError
from svdbatch.core.jsonl import read_jsonl_fast
from svdbatch.inputs.images import ImageCache, check_images
from svdbatch.inputs.manifest import read_manifest, shard_of
from tests.conftest import make_cfg, make_image, write_csv

from .runfiles import failures_of, results_of

SETTINGS = ["run.num_threads=1", "run.progress=false", "run.gallery=false"]


@pytest.fixture
def truncated_manifest(tmp_path) -> Path:
    """Three good images and one that is cut short: its header is fine, its pixels are not."""
    for name in "abc":
        make_image(tmp_path / "img" / f"{name}.png", seed=ord(name))
    cut = make_image(tmp_path / "img" / "full.png", seed=9)
    (tmp_path / "img" / "cut.png").write_bytes(cut.read_bytes()[:-200])
    rows = [[name, f"img/{name}.png"] for name in "abc"] + [["cut", "img/cut.png"]]
    return write_csv(tmp_path / "m.csv", ["id", "image"], rows)


def test_check_images_setting_accepts_modes_and_the_old_booleans():
    assert image_check_mode("header") is ImageCheck.header
    assert image_check_mode(True) is ImageCheck.full and image_check_mode(False) is ImageCheck.none
    with pytest.raises(ConfigError, match="run.check_images: must be one of full, header, none, got 'quick'"):
        image_check_mode("quick")


def test_by_default_a_file_that_only_fails_to_decode_fails_just_its_item(tmp_path, truncated_manifest):
    summary = run(make_cfg(f"manifest={truncated_manifest}", f"run.dir={tmp_path / 'run'}", *SETTINGS))
    assert (summary.done, summary.failed, summary.invalid) == (3, 1, 0)  # exit code 1, the rest done
    (failure,) = failures_of(tmp_path / "run")
    assert failure["id"] == "cut" and "image" in failure["error"].lower()


def test_a_strict_full_check_still_refuses_it_before_anything_runs(tmp_path, truncated_manifest):
    with pytest.raises(ManifestError, match=r"m.csv:5: field 'image': not a readable image"):
        run(make_cfg(f"manifest={truncated_manifest}", f"run.dir={tmp_path / 'run'}", "run.check_images=full", *SETTINGS))
    assert not results_of(tmp_path / "run")


def test_header_check_refuses_what_the_header_shows(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    big = make_image(tmp_path / "big.png", size=(120, 100))
    found = check_images([str(tmp_path / n) for n in ("fake.png", "empty.png", "none.png")] + [str(big)], ImageCheck.header, 6000)
    assert [found[str(tmp_path / n)] for n in ("fake.png", "empty.png", "none.png")] == [
        "not a readable image: not an image format Pillow can read",
        "not a readable image: the file is empty",
        "image file not found",
    ]
    assert "120x100 = 12,000 pixels, more than run.max_image_pixels (6,000)" in found[str(big)]


def forbid_reading_images(monkeypatch) -> list[str]:
    """Make every read of an image's header, pixels or bytes (for its hash) an error."""
    reads: list[str] = []

    def refuse(path, *args, **kwargs):
        reads.append(str(path))
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(svdbatch.inputs.images, "read_image", refuse)
    monkeypatch.setattr(svdbatch.inputs.images, "file_sha256", refuse)
    monkeypatch.setattr(svdbatch.engine.plan, "file_sha256", refuse)
    return reads


def test_a_restart_reads_no_image_and_a_changed_image_is_read_again(tmp_path, monkeypatch):
    for name in "abcd":
        make_image(tmp_path / "img" / f"{name}.png", seed=ord(name))
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [[n, f"img/{n}.png"] for n in "abcd"])
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={tmp_path / 'run'}", "run.limit=2", *SETTINGS)
    assert run(cfg).done == 2
    facts = {Path(r["path"]).name: r for r in read_jsonl_fast(tmp_path / "run" / "cache" / "images.jsonl")}
    assert sorted(facts) == ["a.png", "b.png"]  # run.limit: only the rows this run takes
    assert all(r["checked"] == "header" and len(r["sha256"]) == 64 and r["size"] == [80, 64] for r in facts.values())

    reads = forbid_reading_images(monkeypatch)
    again = run(cfg)
    assert (again.done, again.skipped, reads) == (0, 2, [])

    # Same path, new bytes: size or mtime differ, so it is checked and hashed afresh (and redone).
    monkeypatch.undo()
    make_image(tmp_path / "img" / "a.png", seed=99)
    os.utime(tmp_path / "img" / "a.png", ns=(1, 1))
    redo = run(cfg)
    assert (redo.done, redo.skipped) == (1, 1)


def test_a_shard_checks_only_its_own_images_but_every_row_is_parsed(tmp_path):
    ids = [f"i{n}" for n in range(12)]
    for item_id in ids:
        make_image(tmp_path / "img" / f"{item_id}.png", seed=len(item_id))
    bad = next(item_id for item_id in ids if shard_of(item_id, 2) == 1)
    (tmp_path / "img" / f"{bad}.png").write_bytes(b"garbage")
    rows = [[item_id, f"img/{item_id}.png"] for item_id in ids]
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], rows)
    mine = lambda shard: lambda items: [item for item in items if shard_of(item.id, 2) == shard]  # noqa: E731
    assert len(read_manifest(manifest, check_images="header", select=mine(0)).items) == 12  # the bad image is shard 1's
    with pytest.raises(ManifestError, match=f"field 'image': not a readable image.*img/{bad}.png"):
        read_manifest(manifest, check_images="header", select=mine(1))
    duplicate = write_csv(tmp_path / "d.csv", ["id", "image"], rows + [[ids[0], f"img/{ids[1]}.png"]])
    with pytest.raises(ManifestError, match="duplicate id"):  # found by every shard, whichever holds the rows
        read_manifest(duplicate, check_images="header", select=lambda items: [])


def test_cache_survives_a_torn_line_and_keeps_the_latest_facts(tmp_path):
    image = str(make_image(tmp_path / "a.png"))
    path = tmp_path / "cache" / "images.jsonl"
    cache = ImageCache(path)
    cache.learn(image, os.stat(image), sha256="1" * 64)
    cache.flush()
    with path.open("ab") as handle:
        handle.write(b'{"path": "/x", "byt')  # a writer killed mid-line
    cache = ImageCache(path)
    cache.learn(image, os.stat(image), sha256="2" * 64, checked="full")
    cache.flush()
    reread = ImageCache(path)
    assert reread.facts(image, os.stat(image))["sha256"] == "2" * 64
    assert check_images([image], ImageCheck.full, cache=reread) == {image: None}
    os.utime(image, ns=(5, 5))
    assert reread.facts(image, os.stat(image)) == {}  # mtime changed: nothing is known


def test_status_uses_the_runs_manifest_summary_until_the_manifest_changes(tmp_path, monkeypatch):
    for name in "ab":
        make_image(tmp_path / "img" / f"{name}.png", seed=ord(name))
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [["a", "img/a.png"], ["b", "img/b.png"], [".c", "img/a.png"]])
    run_dir = tmp_path / "run"
    run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.strict=false", "run.limit=1", *SETTINGS))

    def no_parsing(*args, **kwargs):
        raise AssertionError("status parsed the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(svdbatch.reports.status, "read_manifest", no_parsing)
        counts = svdbatch.status(run_dir)["counts"]
    assert (counts["done"], counts["pending"], counts["invalid"], counts["total"]) == (1, 1, 1, 3)

    with manifest.open("a") as handle:
        handle.write("c,img/a.png\n")
    counts = svdbatch.status(run_dir)["counts"]  # edited: parsed afresh
    assert (counts["done"], counts["pending"], counts["total"]) == (1, 2, 4)


def test_an_image_no_check_saw_fails_only_its_item(tmp_path):
    """run.limit checks the first rows only; when a checked row is invalid, the plan takes one
    more row, whose file is missing: that item fails (failures.jsonl), the run goes on."""
    make_image(tmp_path / "img" / "b.png")
    rows = [["a", "img/none-a.png"], ["b", "img/b.png"], ["c", "img/none-c.png"]]
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], rows)
    summary = run(make_cfg(f"manifest={manifest}", f"run.dir={tmp_path / 'run'}", "run.strict=false", "run.limit=2", *SETTINGS))
    assert (summary.done, summary.failed, summary.invalid) == (1, 1, 1)
    failures = {f["id"]: f for f in failures_of(tmp_path / "run")}
    assert "image file not readable" in failures["c"]["error"] and "none-c.png" in failures["c"]["error"]
