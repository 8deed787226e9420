"""Outputs derived from the run dir (metadata.jsonl, WebDataset shards, gallery, sweep page,
summary) hold exactly what the run dir holds, after any mix of shards, limits, redos,
meta_* edits and faults: never one process's view of it."""

from __future__ import annotations

import json
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from svdbatch.dataset import sample_key, write_dataset
from svdbatch.driver import run
from svdbatch.store import RunStore, output_intact
from tests.conftest import make_cfg, make_image, write_csv

HEADER = ["id", "image", "seed", "meta_caption"]


@pytest.fixture
def six(tmp_path) -> tuple[Path, list[list]]:
    """A 6-row manifest; one id has a dot (WebDataset keys must not)."""
    rows = []
    for n, item_id in enumerate(["a", "b.v2", "c", "d", "e", "f"]):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
        rows.append([item_id, f"img/{n}.png", n + 1, f"caption {n}"])
    return write_csv(tmp_path / "m.csv", HEADER, rows), rows


def cfg_for(manifest: Path, run_dir: Path, *extra: str):
    return make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.num_threads=1", "run.gallery=false", *extra)


def metadata(run_dir: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (run_dir / "metadata.jsonl").read_text().splitlines())}


def samples(run_dir: Path) -> dict[str, dict]:
    """Every WebDataset sample of the run dir: key -> {"json": row, "video": bytes}; a key
    found twice (in two shards, or twice in one) fails."""
    found: dict[str, dict] = {}
    seen: Counter[str] = Counter()
    for shard in sorted((run_dir / "webdataset").glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                data = archive.extractfile(member).read()
                seen[f"{key}.{ext}"] += 1
                found.setdefault(key, {})["json" if ext == "json" else "video"] = json.loads(data) if ext == "json" else data
    assert [name for name, count in seen.items() if count > 1] == []
    return found


def assert_exports_match_run_dir(run_dir: Path, shards: bool = True) -> None:
    """metadata.jsonl and the shards list exactly the items done in the run dir, each with
    its current video and sidecar."""
    store = RunStore(run_dir, "mp4")
    done = {i: r for i, r in store.finished_index().items() if output_intact(run_dir, r)}
    listed = metadata(run_dir)
    assert sorted(listed) == sorted(done)
    for item_id, row in listed.items():
        sidecar = store.read_sidecar(item_id)
        assert (run_dir / row["file_name"]).is_file()
        assert row["seed"] == sidecar.seed and row["frames_sha256"] == sidecar.frames_sha256
        assert {k: v for k, v in row.items() if k.startswith("meta_") and v is not None} == sidecar.row.meta
    if shards:
        packed = samples(run_dir)
        assert sorted(packed) == sorted(sample_key(i) for i in done)
        for item_id, row in listed.items():
            sample = packed[sample_key(item_id)]
            assert sample["json"] == row or {k: v for k, v in row.items() if v is not None} == sample["json"]
            assert sample["video"] == (run_dir / row["file_name"]).read_bytes()


def test_shard_processes_and_limits_leave_every_finished_item_in_the_shards(tmp_path, six):
    manifest, _ = six
    run_dir = tmp_path / "run"
    for index in (1, 0):  # the repro: two shard processes on one 6-row manifest
        summary = run(cfg_for(manifest, run_dir, f"run.shard.index={index}", "run.shard.count=2", "output.webdataset=true"))
        assert summary.failed == 0
        assert_exports_match_run_dir(run_dir)
    assert len(metadata(run_dir)) == 6
    assert sorted(samples(run_dir)) == sorted(["a", "b%2Ev2", "c", "d", "e", "f"])  # keys from ids, not positions

    # A run.limit smoke run on the finished run dir keeps all six, and writes nothing new.
    before = {p.name: p.read_bytes() for p in (run_dir / "webdataset").iterdir()}
    limited = run(cfg_for(manifest, run_dir, "run.limit=2", "output.webdataset=true"))
    assert (limited.done, limited.skipped) == (0, 2)
    assert {p.name: p.read_bytes() for p in (run_dir / "webdataset").iterdir()} == before
    assert_exports_match_run_dir(run_dir)


def test_keys_and_bytes_do_not_depend_on_which_process_built_the_shards(tmp_path, six):
    manifest, _ = six
    built = []
    for order in ((0, 1), (1, 0)):
        run_dir = tmp_path / f"run{order[0]}"
        for index in order:
            run(cfg_for(manifest, run_dir, f"run.shard.index={index}", "run.shard.count=2", "output.webdataset=true"))
        (run_dir / "webdataset" / "index.json").unlink()  # rebuilt from the records alone
        for shard in (run_dir / "webdataset").glob("*.tar"):
            shard.unlink()
        write_dataset(RunStore(run_dir, "mp4"), make_cfg("output.webdataset=true").output)
        built.append({p.name: p.read_bytes() for p in (run_dir / "webdataset").glob("*.tar")})
    assert built[0] == built[1] and built[0]


def test_shards_fill_up_across_runs_and_keep_their_items(tmp_path, six):
    """Small shards: a later run adds to the last one and opens new ones; a shard whose
    items did not change is not rewritten."""
    manifest, _ = six
    run_dir = tmp_path / "run"
    run(cfg_for(manifest, run_dir, "run.limit=3", "output.webdataset=true", "output.shard_size=2"))
    shards = run_dir / "webdataset"
    assert sorted(p.name for p in shards.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    first = (shards / "shard-000000.tar").stat().st_mtime_ns
    run(cfg_for(manifest, run_dir, "output.webdataset=true", "output.shard_size=2"))
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"shard-00000{n}.tar" for n in range(3)]
    assert (shards / "shard-000000.tar").stat().st_mtime_ns == first
    assert_exports_match_run_dir(run_dir)
    # A run that does not ask for shards still keeps them current (here: a redo of c).
    rows = [["a", "img/0.png", 1, "caption 0"], ["c", "img/2.png", 33, "caption 2"]]
    write_csv(tmp_path / "two.csv", HEADER, rows)
    assert run(cfg_for(tmp_path / "two.csv", run_dir)).done == 1
    assert samples(run_dir)["c"]["json"]["seed"] == 33
    assert_exports_match_run_dir(run_dir)


def test_concurrent_builders_do_not_corrupt_each_other(tmp_path, six):
    manifest, _ = six
    run_dir = tmp_path / "run"
    run(cfg_for(manifest, run_dir, "output.webdataset=true", "output.shard_size=2"))
    for shard in (run_dir / "webdataset").glob("*.tar"):
        shard.unlink()
    store, output = RunStore(run_dir, "mp4"), make_cfg("output.webdataset=true", "output.shard_size=2").output
    errors = []

    def build() -> None:
        try:
            for _ in range(3):
                write_dataset(store, output)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert_exports_match_run_dir(run_dir)
    assert not [p for p in run_dir.rglob("*") if ".partial-" in p.name]
