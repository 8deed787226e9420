"""`run.emit_manifest=true` is lossless: every row comes out (colliding derived ids made
unique, never dropped), values keep their JSON types, and the emitted manifest, fed back,
gives the same items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svdbatch.cli import emit_manifest
from svdbatch.core.errors import ManifestError
from svdbatch.inputs.manifest import read_manifest
from tests.conftest import make_cfg, make_image, write_jsonl


def same_items(first, second) -> None:
    """Equal items: what the run uses of a row (where it came from aside)."""

    def fields(item):
        return (item.id, item.image or item.url, item.seed, item.overrides, item.meta, item.resize)

    assert [fields(i) for i in first.items] == [fields(i) for i in second.items]


def emit(tmp_path: Path, manifest: Path, *extra: str) -> Path:
    run_dir = tmp_path / "out"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.name=emitted", *extra)
    assert emit_manifest(cfg) == 0
    [emitted] = [p for p in run_dir.iterdir() if p.stem == "emitted"]
    return emitted


def test_colliding_images_of_a_folder_all_come_out_with_unique_ids(tmp_path, capsys):
    folder = tmp_path / "photos"
    for n, name in enumerate(["a.png", "a.jpg", "Cat.png", "cat.webp", "sub/x.png"]):
        make_image(folder / name, seed=n)
    with pytest.raises(ManifestError, match="run.emit_manifest"):  # the run itself refuses, and says the way out
        read_manifest(folder)
    emitted = emit(tmp_path, folder)
    assert "2 rows given new ids" in capsys.readouterr().out
    again = read_manifest(emitted)
    assert sorted(Path(i.image).name for i in again.items) == ["Cat.png", "a.jpg", "a.png", "cat.webp", "x.png"]
    ids = [i.id for i in again.items]
    assert {"a", "Cat", "sub__x"} <= set(ids) and len(set(ids)) == 5  # the first of each keeps its id
    same_items(read_manifest(emitted), again)
    # Non-strict: the same, nothing is dropped.
    emitted = emit(tmp_path, folder, "run.strict=false")
    assert len(read_manifest(emitted).items) == 5


def test_json_values_round_trip_through_the_emitted_manifest(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    rows = [
        {
            "id": "a",
            "image": "img/a.png",
            "seed": 2**63 + 5,
            "fps": 9,
            "noise_aug_strength": 0.1,
            "resize": "pad",
            "meta_tags": ["kite", "red"],
            "meta_box": {"x": 1, "y": [2.5, None]},
            "meta_n": 3,
            "meta_ok": True,
            "meta_note": "",
            "meta_text": 'comma, "quote"\nnewline',
        },
        {"id": "b", "image": "img/a.png", "meta_n": 4.0},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    emitted = emit(tmp_path, manifest)
    assert emitted.suffix == ".jsonl"  # a CSV cell cannot hold a list, a number or an empty text
    first = json.loads(emitted.read_text().splitlines()[0])
    assert first["meta_box"] == {"x": 1, "y": [2.5, None]} and first["meta_tags"] == ["kite", "red"]
    same_items(read_manifest(manifest), read_manifest(emitted))


def test_a_csv_of_text_values_stays_a_csv_and_round_trips(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text('image,motion_bucket_id,meta_caption\nimg/a.png,30,"a, ""b"""\n', encoding="utf-8")
    emitted = emit(tmp_path, manifest)
    assert emitted.suffix == ".csv"
    same_items(read_manifest(manifest), read_manifest(emitted))
