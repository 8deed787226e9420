"""The run dir stays a folder of its own, folder manifests never read svdbatch's own output,
and image URLs obey run.max_image_pixels before their pixels are downloaded or decoded."""

from __future__ import annotations

import logging

import pytest

from svdbatch import run
from svdbatch.core.config import FetchConfig
from svdbatch.core.errors import ManifestError, RunDirError
from svdbatch.inputs import fetch
from svdbatch.inputs.fetch import FetchError, UrlCache
from svdbatch.inputs.manifest import read_manifest
from tests.conftest import FAST, make_cfg, make_image, run_cli, write_csv
from tests.test_bad_inputs import png_header_only
from tests.test_fetch import serving

from .runfiles import failures_of, results_of, video_file

QUIET = [*FAST, "run.num_threads=1", "run.progress=false"]


def listing(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- manifest=. and manifest=.. (the commands from the issue, in a scratch working directory) --


def test_manifest_dot_runs_into_its_own_folder_and_a_rerun_reads_no_thumbnails(tmp_path):
    photos = tmp_path / "photos"
    make_image(photos / "a.png")
    first = run_cli("manifest=.", *QUIET, cwd=photos)
    assert first.returncode == 0, first.stderr
    run_dir = photos / "outputs" / "photos"  # run.name is the folder's real name, not ''
    assert "1 done" in first.stdout and first.stdout.rstrip().endswith(str(run_dir.relative_to(photos)))
    assert (video_file(run_dir, "a", ".mp4")).is_file() and any((run_dir / "gallery").rglob("*.jpg"))
    assert listing(photos) == {"a.png", "outputs"}
    # Before, outputs/photos/gallery/a.jpg came back as a new input on every re-run.
    again = run_cli("manifest=.", *QUIET, cwd=photos)
    assert again.returncode == 0, again.stderr
    assert "0 done, 1 skipped, 0 failed" in again.stdout
    assert [r["id"] for r in results_of(run_dir)] == ["a"]


def test_manifest_dotdot_does_not_make_the_working_directory_the_run_dir(tmp_path):
    work = tmp_path / "work"
    make_image(work / "b.png")
    sub = work / "sub"
    sub.mkdir()
    # run.limit=0: plan the run, generate nothing (where the run dir lands is the point here).
    proc = run_cli("manifest=..", *QUIET, "run.limit=0", cwd=sub)
    assert proc.returncode == 0, proc.stderr
    assert "0 done, 0 skipped, 0 failed" in proc.stdout
    assert listing(sub) == {"outputs"} and listing(work) == {"b.png", "sub"}
    assert (sub / "outputs" / "work" / "config.yaml").is_file()


def test_run_name_dotdot_is_refused_with_a_hint(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["img/a.png"]])
    proc = run_cli(f"manifest={manifest}", "run.name=..", *QUIET, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "is the working directory; give the run a folder of its own, e.g. run.name=myrun" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not {"videos", "items", "records", "layout.json", "config.yaml"} & listing(tmp_path)


@pytest.mark.parametrize(
    "run_dir,what",
    [
        (".", "the working directory"),
        ("outputs", "outputs/ itself"),
        ("..", "a parent of the working directory"),
        ("outputs/..", "the working directory"),
    ],
)
def test_run_dirs_that_are_not_a_folder_of_their_own_are_refused(tmp_path, monkeypatch, run_dir, what):
    make_image(tmp_path / "cwd" / "img" / "a.png")
    manifest = write_csv(tmp_path / "cwd" / "m.csv", ["image"], [["img/a.png"]])
    monkeypatch.chdir(tmp_path / "cwd")
    before = listing(tmp_path / "cwd")
    with pytest.raises(RunDirError, match=f"is {what}.*run.name=myrun"):
        run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}"))
    assert listing(tmp_path / "cwd") == before


def test_the_folder_manifest_itself_is_not_a_run_dir(tmp_path):
    make_image(tmp_path / "photos" / "a.png")
    with pytest.raises(RunDirError, match="is the folder manifest itself"):
        run(make_cfg(f"manifest={tmp_path / 'photos'}", f"run.dir={tmp_path / 'photos'}"))


# -- folder manifests skip run dirs and outputs/ ------------------------------------------------


def test_folder_manifest_skips_run_dirs_and_the_outputs_folder(tmp_path, monkeypatch, caplog):
    root = tmp_path / "photos"
    make_image(root / "img" / "a.png")
    old_run = root / "old_run"  # a run dir someone put inside the folder
    make_image(old_run / "gallery" / "a.jpg")
    (old_run / "results.jsonl").write_text("")
    sharded = root / "sharded"  # a sharded run has only config.shard-*.yaml at first
    make_image(sharded / "videos" / "x" / "0000.png")
    (sharded / "config.shard-0-of-2.yaml").write_text("{}")
    make_image(root / "outputs" / "sample" / "gallery" / "b.jpg")  # outputs/ of the working directory
    make_image(root / "notes" / "config" / "c.png")  # just a folder: read
    monkeypatch.chdir(root)
    with caplog.at_level(logging.WARNING, logger="svdbatch.inputs.manifest_formats"):
        ids = [item.id for item in read_manifest(root).items]
    assert ids == ["img__a", "notes__config__c"]
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    assert "old_run" in skipped and "sharded" in skipped and "outputs" in skipped
    # From elsewhere, outputs/ is just a folder; run dirs are still skipped.
    monkeypatch.chdir(tmp_path)
    assert [item.id for item in read_manifest(root).items] == ["img__a", "notes__config__c", "outputs__sample__gallery__b"]


def test_a_run_dir_or_outputs_is_not_a_folder_manifest(tmp_path, monkeypatch):
    run_dir = tmp_path / "outputs" / "sample"
    make_image(run_dir / "gallery" / "a.jpg")
    (run_dir / "failures.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    for folder, what in [(run_dir, "a run dir"), (tmp_path / "outputs", "the outputs/ folder")]:
        with pytest.raises(ManifestError, match=f"is {what} \\(svdbatch's output\\), not a folder of input images"):
            read_manifest(folder)


def test_folder_manifest_refuses_ids_that_collide_on_macos_and_windows(tmp_path):
    make_image(tmp_path / "photos" / "Cat.png")
    make_image(tmp_path / "photos" / "cat.png")
    make_image(tmp_path / "photos" / "con.png")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "photos")
    problems = sorted(str(p) for p in info.value.problems)
    assert problems[0].endswith(
        ":2: field 'id': id 'cat' and 'Cat' on line 1 differ only by case or Unicode normalisation: "
        "they would name the same file on macOS and Windows; "
        "give an id column, or let run.emit_manifest=true write a manifest with unique ids"
    )
    assert ":3: field 'image': the id derived from it is a reserved device name on Windows" in problems[1]


# -- image URLs and run.max_image_pixels ------------------------------------------------------


@pytest.fixture
def bomb_server(tmp_path):
    header = png_header_only(tmp_path / "bomb.png", 60000, 60000).read_bytes()
    make_image(tmp_path / "small.png")  # 80x64
    files = {
        "/bomb.png": header,
        "/padded-bomb.png": header + bytes(2 * 2**20),
        "/small.png": (tmp_path / "small.png").read_bytes(),
    }
    with serving(files) as httpd:
        yield httpd


QUICK = FetchConfig(timeout_s=5, retries=2, backoff_s=0.0, max_bytes=2**20)
BOMB = "image is 60000x60000 = 3,600,000,000 pixels, more than run.max_image_pixels (100,000,000)"


def test_url_bomb_is_refused_from_the_first_bytes(tmp_path, bomb_server):
    """The header says 60000x60000: refused while downloading, before fetch.max_bytes (1 MiB
    here, the body is 2 MiB) is reached, without a retry and without caching anything."""
    cache = UrlCache(tmp_path / "downloads", QUICK)
    with pytest.raises(FetchError, match=BOMB.replace("(", r"\(").replace(")", r"\)")):
        cache.fetch(bomb_server.url("/padded-bomb.png"))
    assert bomb_server.hits["/padded-bomb.png"] == 1
    assert not (tmp_path / "downloads").exists()


def test_url_bomb_is_refused_before_decoding_when_the_header_scan_missed_it(tmp_path, bomb_server, monkeypatch):
    monkeypatch.setattr(fetch, "HEADER_SCAN_BYTES", 0)  # as if the header came after 4 MiB of metadata
    cache = UrlCache(tmp_path / "downloads", QUICK)
    with pytest.raises(FetchError, match="more than run.max_image_pixels"):
        cache.fetch(bomb_server.url("/bomb.png"))
    assert not (tmp_path / "downloads").exists()


def test_run_max_image_pixels_applies_to_urls(tmp_path, bomb_server):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [["small", bomb_server.url("/small.png")]])
    summary = run(
        make_cfg(
            f"manifest={manifest}",
            f"run.dir={tmp_path / 'run'}",
            "run.max_image_pixels=5000",
            "run.num_threads=1",
            "run.progress=false",
            "run.gallery=false",
        )
    )
    assert (summary.done, summary.failed) == (0, 1)
    (failure,) = failures_of(tmp_path / "run")
    assert "image is 80x64 = 5,120 pixels, more than run.max_image_pixels (5,000)" in failure["error"]
