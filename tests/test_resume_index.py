"""The resume snapshot (rundir/resume_index.py): a restart loads it and decodes only the
records appended since, and gets exactly the index a full read of the records gives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from svdbatch.rundir import records, resume_index
from svdbatch.rundir.resume_index import SNAPSHOT, compact_index, load, update


def results_file(root: Path, writer: str) -> Path:
    return records.records_dir(root) / f"{writer}{records.RESULTS_SUFFIX}"


def append(path: Path, *lines: dict, raw: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(b"".join(json.dumps(line, sort_keys=True).encode() + b"\n" for line in lines) + raw)


def done(item_id: str, at: int, key: str = "k", **extra) -> dict:
    return {
        "id": item_id,
        "key": f"{key}-{item_id}",
        "output": f"videos/{item_id}.mp4",
        "output_bytes": 10,
        "sidecar_bytes": 20,
        "output_key": "ok",
        "image_path": "/img.png",
        "image_sha256": "s",
        "image_bytes": 5,
        "image_mtime_ns": 7,
        "meta_sha256": "m",
        "recorded_ns": at,
        **extra,
    }


def fresh(root: Path) -> dict:
    """The index a full read of the records gives (no snapshot)."""
    latest: dict = {}
    update(latest, {}, root)
    return latest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    append(root / records.LEGACY_RESULTS, done("old", 0), done("a", 0, key="legacy"), done("old", 0, key="again"))
    append(results_file(root, "0000000000001-h-1"), *(done(f"i{n}", 100 + n) for n in range(50)))
    append(results_file(root, "0000000000002-h-2"), done("a", 90), done("b", 95))
    return root


def snapshot_of(root: Path) -> dict:
    index = compact_index(root, root / "cache", save_after=0)
    assert (root / "cache" / SNAPSHOT).is_file()
    return index


def test_appends_after_the_snapshot_give_the_index_a_full_read_gives(run_dir: Path):
    before = snapshot_of(run_dir)
    assert before == fresh(run_dir) and before["old"].key == "again-old" and before["a"].key == "k-a"
    first, second = results_file(run_dir, "0000000000001-h-1"), results_file(run_dir, "0000000000002-h-2")
    # The first writer goes on; the second redoes an item the first finished, removes one,
    # updates one's metadata; a third writer appears, with a record older than one it loses to.
    append(first, done("i3", 500, key="redo", redo=True), done("new1", 501))
    append(second, {"id": "i4", "removed": True, "recorded_ns": 502}, done("i5", 503, meta_sha256="m2"))
    append(results_file(run_dir, "0000000000003-h-3"), done("i6", 99, key="stale"), done("new2", 504))
    append(run_dir / records.LEGACY_RESULTS, done("old", 0, key="latest legacy"), done("i7", 0, key="legacy loses"))
    latest, covered = load(run_dir / "cache" / SNAPSHOT, run_dir)
    assert latest == before and covered  # the snapshot was used...
    decoded = update(latest, covered, run_dir)
    assert decoded < 2000  # ...and only the appended lines were decoded
    assert latest == fresh(run_dir) == compact_index(run_dir, run_dir / "cache")
    assert latest["i3"].key == "redo-i3" and latest["i4"].output is None and latest["i5"].meta_sha256 == "m2"
    assert latest["i6"].key == "k-i6" and latest["old"].key == "latest legacy-old" and latest["i7"].key == "k-i7"
    assert {"new1", "new2"} <= set(latest)


def test_a_store_saves_the_snapshot_only_after_decoding_much(run_dir: Path, monkeypatch):
    from svdbatch.rundir.store import RunStore

    store = RunStore(run_dir, "mp4")
    store.finished_index(compact=True)
    assert not (store.cache / SNAPSHOT).exists()  # a few records: not worth a file
    monkeypatch.setattr(resume_index, "SAVE_AFTER_BYTES", 100)
    assert store.finished_index(compact=True) == fresh(run_dir) and (store.cache / SNAPSHOT).is_file()


@pytest.mark.parametrize("change", ["cut", "replaced", "rewritten", "vanished"])
def test_records_changed_other_than_by_appends_rebuild_the_index(run_dir: Path, change: str):
    snapshot_of(run_dir)
    path = results_file(run_dir, "0000000000001-h-1")
    data = path.read_bytes()
    if change == "cut":  # by hand: the last line is gone
        path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1])
    elif change == "replaced":  # another file, as long or longer, under the same name
        path.unlink()
        append(path, *(done(f"i{n}", 100 + n, key="other") for n in range(50)))
    elif change == "rewritten":  # same inode, same size, other bytes at the covered end
        path.write_bytes(data.replace(b'"recorded_ns": 149', b'"recorded_ns": 148'))
    else:
        path.unlink()
    assert load(run_dir / "cache" / SNAPSHOT, run_dir) == ({}, {})
    assert compact_index(run_dir, run_dir / "cache") == fresh(run_dir)
    if change == "cut":
        assert "i49" not in fresh(run_dir)
    if change == "replaced":
        assert fresh(run_dir)["i49"].key == "other-i49"
    if change == "rewritten":
        assert fresh(run_dir)["i49"].recorded_ns == 148


def test_a_torn_line_is_no_record_until_complete(run_dir: Path):
    path = results_file(run_dir, "0000000000002-h-2")
    line = json.dumps(done("c", 600)).encode()
    append(path, raw=line[:20])  # a live writer's line, half written (or a killed one's)
    assert "c" not in snapshot_of(run_dir)
    append(path, raw=line[20:] + b"\n")
    index = compact_index(run_dir, run_dir / "cache")
    assert index["c"].key == "k-c" and index == fresh(run_dir)


@pytest.mark.parametrize("damage", [b"", b"garbage", b"\xe3\x00\x00"])
def test_a_damaged_snapshot_is_rebuilt(run_dir: Path, damage: bytes):
    expected = snapshot_of(run_dir)
    snapshot = run_dir / "cache" / SNAPSHOT
    snapshot.write_bytes(damage or snapshot.read_bytes()[: os.path.getsize(snapshot) // 2])
    assert compact_index(run_dir, run_dir / "cache") == expected


def test_a_snapshot_of_another_version_is_not_read(run_dir: Path, monkeypatch):
    snapshot_of(run_dir)
    monkeypatch.setattr(resume_index, "VERSION", "another")
    assert load(run_dir / "cache" / SNAPSHOT, run_dir) == ({}, {})


def test_many_chunks_load_back(run_dir: Path, monkeypatch):
    monkeypatch.setattr(resume_index, "CHUNK", 7)
    expected = snapshot_of(run_dir)
    latest, _ = load(run_dir / "cache" / SNAPSHOT, run_dir)
    assert latest == expected and all(type(r) is resume_index.ResumeRecord for r in latest.values())


def test_a_running_driver_keeps_the_snapshot_up_to_date(run_dir: Path, monkeypatch):
    """SnapshotKeeper: after the records grew enough, the snapshot covers them all, so a
    run killed now would restart decoding nothing."""
    import time

    from svdbatch.engine.snapshot_keeper import SnapshotKeeper
    from svdbatch.rundir.store import RunStore

    store = RunStore(run_dir, "mp4")
    keeper = SnapshotKeeper(store, every_s=0.01)
    assert not keeper.refresh() and not (store.cache / SNAPSHOT).exists()  # nothing new yet
    monkeypatch.setattr(resume_index, "SAVE_AFTER_BYTES", 200)
    append(results_file(run_dir, "0000000000004-h-4"), *(done(f"n{n}", 700 + n) for n in range(5)))
    keeper.start()
    deadline = time.monotonic() + 10
    while not (store.cache / SNAPSHOT).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.stop()
    latest, covered = load(store.cache / SNAPSHOT, run_dir)
    assert latest == fresh(run_dir) and update(latest, covered, run_dir) == 0
