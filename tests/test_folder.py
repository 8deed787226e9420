"""A folder of images, or one image file, as the manifest, and the manifest it derives (run.emit_manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svdbatch import run
from svdbatch.core.errors import ManifestError
from svdbatch.inputs.ids import derive_seed
from svdbatch.inputs.manifest import read_manifest
from tests.conftest import FAST, make_cfg, make_image, run_cli

from .runfiles import results_of, video_file


def photo_folder(root, with_b=True):
    if with_b:
        make_image(root / "b.png", seed=1)
    make_image(root / "a.jpg", seed=2)
    make_image(root / "trips" / "2024" / "c.webp", seed=3)
    make_image(root / ".thumbs" / "x.png", seed=4)  # hidden: skipped
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_rows_are_sorted_with_ids_from_paths_and_derived_seeds(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    manifest = read_manifest(folder, run_seed=3)
    assert [item.id for item in manifest.items] == ["a", "b", "trips__2024__c"]
    assert [item.image_ref for item in manifest.items] == ["a.jpg", "b.png", "trips/2024/c.webp"]
    assert all(item.seed == derive_seed(3, item.id) and item.seed_derived for item in manifest.items)
    assert Path(manifest.items[2].image) == (folder / "trips" / "2024" / "c.webp").resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="folder has no images"):
        read_manifest(empty)


def test_folder_runs_and_its_emitted_manifest_resumes_the_same_items(tmp_path):
    folder = photo_folder(tmp_path / "photos", with_b=False)
    run_dir = tmp_path / "out" / "photos"
    # The emitted CSV lands in the run dir and is named after the folder, so it resumes there.
    proc = run_cli(f"manifest={folder}", "run.emit_manifest=true", f"hydra.run.dir={run_dir}", *FAST)
    assert proc.returncode == 0, proc.stderr
    emitted = run_dir / "photos.csv"
    assert f"wrote {emitted} (2 rows)" in proc.stdout
    assert not results_of(run_dir)  # emitting generates nothing
    lines = emitted.read_text().splitlines()
    assert lines[0] == "id,image,seed" and lines[2].startswith("trips__2024__c,../../photos/trips/2024/c.webp,")

    first = run(make_cfg(f"manifest={folder}", f"run.dir={run_dir}"))
    assert first.done == 2
    again = run(make_cfg(f"manifest={emitted}", f"run.dir={run_dir}"))
    assert (again.done, again.skipped) == (0, 2)
    assert sorted(r["id"] for r in results_of(run_dir)) == ["a", "trips__2024__c"]


def test_an_image_file_is_a_one_row_manifest(tmp_path):
    image = make_image(tmp_path / "photos" / "cat.png")
    manifest = read_manifest(image)
    (item,) = manifest.items
    assert (item.id, item.image, item.seed) == ("cat", str(image), derive_seed(0, "cat"))
    summary = run(make_cfg(f"manifest={image}", f"run.dir={tmp_path / 'run'}", "run.num_threads=1"))
    assert summary.done == 1 and (video_file(tmp_path / "run", "cat", ".mp4")).is_file()
