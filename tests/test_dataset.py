"""The run dir as a dataset: metadata.jsonl for `datasets`' videofolder, WebDataset shards."""

from __future__ import annotations

import json
import os
import tarfile
import time

import datasets
import pytest

from svdbatch import run
from svdbatch.rundir.dataset import write_metadata
from svdbatch.rundir.store import RunStore
from tests.conftest import make_cfg, make_image, write_csv

from .runfiles import video_file, video_rel


def metadata(run_dir):
    return [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]


def test_metadata_and_shards_list_only_finished_items_and_follow_resumes(tmp_path, images):
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(images["c"].read_bytes()[:60])
    header = ["id", "image", "seed", "meta_caption"]
    rows = [["a", "img/a.png", 1, "a red kite"], ["b.v2", "img/b.png", 2, None], ["broken", "img/broken.png", 3, None]]
    manifest = write_csv(tmp_path / "m.csv", header, rows)
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        f"manifest={manifest}", f"run.dir={run_dir}", "run.check_images=false", "output.webdataset=true", "output.shard_size=2"
    )
    first = run(cfg)
    assert (first.done, first.failed) == (2, 1)

    listed = metadata(run_dir)
    assert [row["id"] for row in listed] == ["a", "b.v2"]  # the failed item is not listed
    assert listed[0]["file_name"] == video_rel(run_dir, "a") and (run_dir / listed[0]["file_name"]).is_file()
    assert listed[0]["seed"] == 1 and listed[0]["image"] == "img/a.png" and listed[0]["motion_bucket_id"] == 127
    assert listed[0]["meta_caption"] == "a red kite" and listed[1]["meta_caption"] is None
    assert not [p for p in run_dir.iterdir() if ".partial-" in p.name]

    # The documented call: one row per finished item with the conditioning columns.
    loaded = datasets.load_dataset("videofolder", data_dir=str(run_dir), cache_dir=str(tmp_path / "hf"))["train"]
    loaded = loaded.cast_column("video", datasets.Video(decode=False))  # decoding would need torchcodec
    assert loaded.num_rows == 2
    assert {"video", "id", "seed", "image", "fps", "motion_bucket_id", "noise_aug_strength", "resize"} <= set(loaded.column_names)
    first = loaded[0]
    assert first["id"] == "a" and first["video"]["path"] == str(video_file(run_dir, "a", ".mp4"))

    # Shard 0 holds the finished a and b.v2 (keys from ids, the dot escaped); `broken` is not finished.
    shards = run_dir / "webdataset"
    assert sorted(p.name for p in shards.glob("*.tar")) == ["shard-000000.tar"]
    with tarfile.open(shards / "shard-000000.tar") as archive:
        assert archive.getnames() == ["a.mp4", "a.json", "b%2Ev2.mp4", "b%2Ev2.json"]
        assert archive.extractfile("a.mp4").read() == (video_file(run_dir, "a", ".mp4")).read_bytes()
        assert json.loads(archive.extractfile("b%2Ev2.json").read())["id"] == "b.v2"
    shard0 = (shards / "shard-000000.tar").stat().st_mtime_ns

    # Resume after fixing the broken image: metadata and the last shard catch up; shard 0 stays.
    make_image(broken, seed=9)
    resumed = run(cfg)
    assert (resumed.done, resumed.skipped, resumed.failed) == (1, 2, 0)
    assert [row["id"] for row in metadata(run_dir)] == ["a", "b.v2", "broken"]
    assert sorted(p.name for p in shards.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (shards / "shard-000000.tar").stat().st_mtime_ns == shard0

    # Redoing b.v2 with another seed rewrites the shard that holds it, with the new video.
    rows[1][2] = 22
    write_csv(manifest, header, rows)
    assert run(cfg).done == 1
    assert [row["seed"] for row in metadata(run_dir)] == [1, 22, 3]
    with tarfile.open(shards / "shard-000000.tar") as archive:
        assert json.loads(archive.extractfile("b%2Ev2.json").read())["seed"] == 22
        assert archive.extractfile("b%2Ev2.mp4").read() == (video_file(run_dir, "b.v2", ".mp4")).read_bytes()

    # A smoke run over part of the manifest (or one shard of it) still lists the whole run dir.
    limited = run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.check_images=false", "run.limit=1"))
    assert (limited.done, limited.skipped) == (0, 1)
    assert [row["id"] for row in metadata(run_dir)] == ["a", "b.v2", "broken"]

    # a's image changes and its redo fails: its old video stays finished, so metadata.jsonl
    # and its shard keep it, described by the old sidecar.
    images["a"].write_bytes(images["a"].read_bytes()[:60])
    old_a = (video_file(run_dir, "a", ".mp4")).read_bytes()
    assert run(cfg).failed == 1
    assert sorted(p.name for p in shards.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert [row["id"] for row in metadata(run_dir)] == ["a", "b.v2", "broken"]
    with tarfile.open(shards / "shard-000000.tar") as archive:
        assert archive.extractfile("a.mp4").read() == old_a


def test_bad_shard_size_and_fetch_settings_are_config_errors(tmp_path, images):
    from svdbatch.core.errors import ConfigError
    from svdbatch.engine.prepare import load_manifest

    manifest = write_csv(tmp_path / "m.csv", ["image"], [["img/a.png"]])
    with pytest.raises(ConfigError) as caught:
        load_manifest(make_cfg(f"manifest={manifest}", "output.shard_size=0", "fetch.timeout_s=0"))
    assert "output.shard_size: must be >= 1" in str(caught.value) and "fetch.timeout_s: must be > 0" in str(caught.value)


def test_stale_temporaries_of_downloads_and_shards_are_cleaned(tmp_path):
    store = RunStore(tmp_path / "run", "mp4")
    store.prepare()
    old = time.time() - 3600
    leftovers = []
    for folder, name in (("downloads", ".abc.partial-x1.png"), ("webdataset", ".shard-000000.partial-y2.tar")):
        (store.root / folder).mkdir()
        leftover = store.root / folder / name
        leftover.write_bytes(b"half")
        os.utime(leftover, (old, old))
        leftovers.append(leftover)
    fresh = store.root / "downloads" / ".def.partial-z3.png"  # another live process may be writing it
    fresh.write_bytes(b"in progress")
    store.prepare()
    assert not any(p.exists() for p in leftovers) and fresh.exists()


def test_metadata_rows_are_rebuilt_only_for_items_committed_since_the_last_run(tmp_path, images, monkeypatch):
    """Every run rewrites metadata.jsonl; it reads a sidecar again only for an item whose
    latest commit is new, and a redone item's row follows its new sidecar."""
    header = ["id", "image", "seed", "meta_caption"]
    manifest = write_csv(tmp_path / "m.csv", header, [["a", "img/a.png", 1, "kite"], ["b", "img/b.png", 2, "boat"]])
    run_dir = tmp_path / "run"
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")).done == 2
    before = (run_dir / "metadata.jsonl").read_bytes()

    reads = []
    real_read = RunStore.read_sidecar
    monkeypatch.setattr(RunStore, "read_sidecar", lambda self, item_id: reads.append(item_id) or real_read(self, item_id))
    store = RunStore(run_dir, "mp4")
    write_metadata(store)
    assert reads == [] and (run_dir / "metadata.jsonl").read_bytes() == before

    # b redone with another seed: only its sidecar is read, and its row says the new seed.
    write_csv(manifest, header, [["a", "img/a.png", 1, "kite"], ["b", "img/b.png", 7, "a boat"]])
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")).done == 1
    reads.clear()
    (run_dir / "metadata.jsonl").unlink()
    write_metadata(store)
    assert reads == []  # the run's own rewrite already learnt b's new row
    assert [(r["id"], r["seed"], r["meta_caption"]) for r in metadata(run_dir)] == [("a", 1, "kite"), ("b", 7, "a boat")]

    # A damaged or foreign cache is ignored, never trusted: every sidecar is read again.
    (run_dir / "cache" / "metadata-rows.json").write_text('{"version": 1, "rows": {"a": [[], {"id": "wrong"}]}}')
    write_metadata(store)
    assert sorted(reads) == ["a", "b"]
    assert [(r["id"], r["seed"]) for r in metadata(run_dir)] == [("a", 1), ("b", 7)]

    # An item whose video is deleted leaves the list without its sidecar being read.
    reads.clear()
    (video_file(run_dir, "a", ".mp4")).unlink()
    write_metadata(store)
    assert reads == [] and [r["id"] for r in metadata(run_dir)] == ["b"]
