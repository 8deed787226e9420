"""Manifests at scale (issue 22): a shard validates only its own rows, a restart reads its
validated rows back from the parse cache, bad input is summarised on the terminal and
recorded in full, and a resume's plan keeps only what is left to do. No model runs here."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from svdbatch import api
from svdbatch.commands import validate
from svdbatch.core.errors import SHOWN_PROBLEMS, ManifestError
from svdbatch.engine.plan import plan_run
from svdbatch.engine.prepare import load_manifest, record_invalid_rows
from svdbatch.engine.shards import Shard
from svdbatch.engine.summary import RunSummary
from svdbatch.inputs.images import ImageCache
from svdbatch.inputs.manifest import read_manifest, shard_of
from svdbatch.inputs.row_checks import RowValidator
from svdbatch.rundir import record_writer
from svdbatch.rundir.sidecar import result_record
from svdbatch.rundir.store import INVALID_ROW, RunStore
from tests.conftest import make_cfg, make_image, write_csv
from tests.runfiles import failures_of

N = 40  # rows over 4 shards


@pytest.fixture
def rows(tmp_path) -> list[list]:
    make_image(tmp_path / "img" / "a.png")
    return [[f"i{n}", "img/a.png", n] for n in range(N)]


def ids_of(shard: int, count: int = 4) -> list[str]:
    return [f"i{n}" for n in range(N) if shard_of(f"i{n}", count) == shard]


def test_a_shard_validates_only_its_own_rows(tmp_path, rows):
    """A bad row in shard 1 stops shard 1 only (strict), and shard 0 neither reports nor
    counts it; a row too broken to have an id belongs to shard 0."""
    bad_id = ids_of(1)[0]
    rows[int(bad_id[1:])][2] = "-5"  # a bad seed
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    mine = read_manifest(manifest, check_images="header", shard=(0, 4))
    assert [item.id for item in mine.items] == ids_of(0) and not mine.bad_rows
    assert mine.other_rows == N - len(ids_of(0))
    with pytest.raises(ManifestError, match=f"m.csv:{int(bad_id[1:]) + 2}: field 'seed'") as caught:
        read_manifest(manifest, check_images="header", shard=(1, 4))
    assert len(caught.value.problems) == 1
    lenient = read_manifest(manifest, check_images="header", shard=(1, 4), strict=False)
    assert [item_id for _, item_id, _ in lenient.bad_rows] == [bad_id]

    broken = tmp_path / "broken.csv"
    broken.write_text(manifest.read_text() + "x,y,z,extra\n")  # wrong field count: no id to shard by
    assert len(read_manifest(broken, check_images="header", shard=(0, 4), strict=False).bad_rows) == 1
    for shard in (1, 2, 3):
        assert len(read_manifest(broken, check_images="header", shard=(shard, 4), strict=False).bad_rows) == (shard == 1)


def test_duplicates_are_found_by_the_shard_that_holds_them(tmp_path, rows):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows + [["i7", "img/a.png", 1]])
    holder = shard_of("i7", 4)
    with pytest.raises(ManifestError, match="duplicate id 'i7'"):
        read_manifest(manifest, check_images="header", shard=(holder, 4))
    assert read_manifest(manifest, check_images="header", shard=((holder + 1) % 4, 4)).items


def test_validate_with_shard_settings_checks_what_that_shard_runs(tmp_path, rows, capsys):
    bad_id = ids_of(2)[0]
    rows[int(bad_id[1:])][2] = "x"
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    base = [f"manifest={manifest}", "run.strict=false", "run.shard.count=4"]
    for shard in range(4):
        result = api.validate(make_cfg(*base, f"run.shard.index={shard}"))
        loaded = load_manifest(make_cfg(*base, f"run.shard.index={shard}"), Shard(shard, 4))  # what the run validates
        assert result.valid == len(loaded.items) == len(ids_of(shard)) - (shard == 2)
        assert [item_id for _, item_id, _ in result.invalid] == ([bad_id] if shard == 2 else [])
        assert result.other_rows == N - len(ids_of(shard))
    assert validate([*base, "run.shard.index=2"]) == 2
    assert "(shard 2 of 4;" in capsys.readouterr().out


def many_bad_rows(tmp_path: Path, good: int = 30, bad: int = 25) -> Path:
    make_image(tmp_path / "img" / "a.png")
    rows = [[f"g{n}", "img/a.png", n] for n in range(good)] + [[f"b{n}", "img/a.png", -n - 1] for n in range(bad)]
    return write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)


def test_many_bad_rows_show_the_first_few_and_a_count(tmp_path, capsys):
    manifest = many_bad_rows(tmp_path)
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest, check_images="header")
    assert len(caught.value.problems) == 25  # every problem is collected...
    message = str(caught.value).splitlines()
    assert message[0] == "25 problem(s) in the manifest:"
    assert len(message) == 1 + SHOWN_PROBLEMS + 1  # ...the first ten shown, with file:row and field
    assert message[1].startswith(f"  {manifest}:32: field 'seed'")
    assert message[-1].startswith("  ... and 15 more (`svdbatch validate ... --all` lists every one")

    assert validate([f"manifest={manifest}"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1 + SHOWN_PROBLEMS + 1
    assert validate([f"manifest={manifest}", "--all"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1 + 25
    assert validate([f"manifest={manifest}", "run.strict=false"]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == SHOWN_PROBLEMS + 1 and "... and 15 more" in captured.err
    assert "30 valid rows, 25 invalid" in captured.out


def test_a_lenient_run_records_every_bad_row_in_one_write(tmp_path, caplog):
    manifest = read_manifest(many_bad_rows(tmp_path), check_images="header", strict=False)
    store = RunStore(tmp_path / "run", "mp4")
    store.prepare()
    summary = RunSummary(run_dir=store.root)
    with caplog.at_level(logging.WARNING):
        record_invalid_rows(store, manifest, summary)
    records = failures_of(store.root)
    assert summary.invalid == 25 and [r["id"] for r in records] == [f"b{n}" for n in range(25)]
    assert all(r["error"] == INVALID_ROW and "field 'seed'" in r["problems"][0] for r in records)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and warning[0].count("\n") == SHOWN_PROBLEMS + 1
    assert "... and 15 more (all recorded in records/*.failures.jsonl)" in warning[0]


def test_the_parse_cache_is_used_until_the_manifest_or_settings_change(tmp_path, rows):
    table = [row + ["", "note" if row[0] == "i3" else "", "pad" if row[0] == "i6" else ""] for row in rows]
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed", "motion_bucket_id", "meta_note", "resize"], table)
    cache = tmp_path / "cache"

    def read(**kwargs):
        return read_manifest(manifest, check_images="header", parse_cache=cache, **kwargs)

    first = read()
    again = read()
    assert not first.cached and again.cached and again.items == first.items
    assert (
        again.items[3].meta == {"meta_note": "note"} and again.items[6].resize == "pad" and again.items[5].seed_derived is False
    )
    text = manifest.read_text().replace("i5,img/a.png,5,", "i5,img/a.png,5,99")  # a row edited
    manifest.write_text(text)
    edited = read()
    assert not edited.cached and edited.items[5].overrides == {"motion_bucket_id": 99}
    assert read().cached
    os.utime(manifest, ns=(1, 1))  # touched: size unchanged, mtime not
    assert not read().cached and read().cached
    assert not read(run_seed=7).cached and read(run_seed=7).cached  # other settings: validated again...
    assert not read().cached  # ...and they replace the file of the earlier settings
    assert not read(shard=(0, 2)).cached and read(shard=(0, 2)).cached
    assert read().cached and len(list(cache.glob("rows-*.json"))) == 2  # one per shard sharing the run dir
    assert read(shard=(0, 2)).items == read_manifest(manifest, check_images="header", shard=(0, 2)).items

    (tmp_path / "img" / "a.png").write_bytes(b"broken now")  # images are checked again, never cached
    with pytest.raises(ManifestError, match="not a readable image"):
        read()


def test_a_damaged_parse_cache_is_ignored(tmp_path, rows):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    cache = tmp_path / "cache"
    read_manifest(manifest, check_images="header", parse_cache=cache)
    (cached_file,) = cache.iterdir()
    body = json.loads(cached_file.read_text())
    body["ids"] = body["ids"][:-1]
    cached_file.write_text(json.dumps(body))
    again = read_manifest(manifest, check_images="header", parse_cache=cache)
    assert not again.cached and len(again.items) == N


def test_a_resume_plan_keeps_only_what_is_left_and_agrees_with_the_full_index(tmp_path, rows):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    cfg = make_cfg(f"manifest={manifest}")
    items = read_manifest(manifest, check_images="header").items
    store = RunStore(tmp_path / "run", cfg.output.format)
    store.prepare()
    identity = {"source": "test"}

    def plan(**kwargs):
        return plan_run(items, cfg.conditioning, cfg.model, cfg.memory, identity, store, output=cfg.output, **kwargs)

    first = plan()
    results = record_writer.writer(store.root)  # the first 30 finished (as bench/plan.py fakes them)
    for entry in first.todo[:30]:
        store.video_path(entry.item.id).parent.mkdir(parents=True, exist_ok=True)
        store.sidecar_path(entry.item.id).parent.mkdir(parents=True, exist_ok=True)
        store.video_path(entry.item.id).write_bytes(b"v" * 10)
        sidecar = {
            "id": entry.item.id,
            "key": entry.key,
            "output_key": entry.output_key,
            "seed": entry.item.seed,
            "image": entry.image_record(),
            "frames_sha256": "",
            "finished_at": "2026-01-01T00:00:00+00:00",
            "output": {"path": store.relative(store.video_path(entry.item.id)), "bytes": 10},
            "timings": {"total_s": 1.0},
        }
        body = json.dumps(sidecar).encode()
        store.sidecar_path(entry.item.id).write_bytes(body)
        results.append_result(result_record(sidecar, len(body)))
    store.video_path("i4").write_bytes(b"v")  # truncated since: not done any more
    store.sidecar_path("i9").unlink()  # deleted

    full = plan()
    lean = plan(keep_done=False)
    assert full.done_count == len(full.done) == lean.done_count == 28 and not lean.done
    assert [e.item.id for e in lean.todo] == [e.item.id for e in full.todo] == ["i4", "i9"] + [f"i{n}" for n in range(30, N)]
    assert lean.total == full.total == N and lean.all == lean.todo
    assert pickle.loads(pickle.dumps(lean.todo)) == lean.todo  # slots: still sent to worker processes as before
    compact, index = store.finished_index(compact=True), store.finished_index()
    assert set(compact) == set(index)
    for entry in first.todo:
        item_id = entry.item.id
        assert store.is_done(item_id, entry.key, entry.output_key, compact) == store.is_done(
            item_id, entry.key, entry.output_key, index
        )
        assert not store.is_done(item_id, "other key", entry.output_key, compact)
    assert all(compact[i].get(name) == index[i].get(name) for i in index for name in compact[i]._fields)


def test_image_cache_and_parse_cache_let_a_restart_skip_every_row_check(tmp_path, rows, monkeypatch):
    """A restart with the same manifest validates no row: the parse cache answers, and the
    image cache answers the image checks from one stat per distinct file."""
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    cache_dir, images = tmp_path / "cache", ImageCache(tmp_path / "cache" / "images.jsonl")
    read_manifest(manifest, check_images="header", parse_cache=cache_dir, image_cache=images)
    images.flush()

    def no_row_checks(*args, **kwargs):
        raise AssertionError("a row was validated again")

    monkeypatch.setattr(RowValidator, "add", no_row_checks)
    again = read_manifest(
        manifest, check_images="header", parse_cache=cache_dir, image_cache=ImageCache(tmp_path / "cache" / "images.jsonl")
    )
    assert again.cached and len(again.items) == N


def test_the_parse_cache_gives_back_typed_jsonl_rows_and_derived_seeds(tmp_path):
    make_image(tmp_path / "img" / "a.png")
    rows = [
        {"image": "img/a.png", "id": "x", "meta_score": 0.5, "meta_tags": ["a", {"b": 1}], "fps": 7},
        {"image": "img/a.png", "id": "y", "seed": 2**64 - 1, "noise_aug_strength": 0.02},
        {"image": "img/a.png", "id": "z"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first = read_manifest(manifest, check_images="header", run_seed=3, parse_cache=tmp_path / "cache")
    again = read_manifest(manifest, check_images="header", run_seed=3, parse_cache=tmp_path / "cache")
    assert again.cached and again.items == first.items
    assert [type(v) for v in again.items[0].overrides.values()] == [int] and again.items[2].seed_derived
