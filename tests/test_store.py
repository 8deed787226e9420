"""Run-dir bookkeeping: atomic writes, torn-line repair, keys."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from svdbatch.outputs import atomic_path, atomic_write_bytes
from svdbatch.store import RunDirError, RunStore, append_jsonl, item_key, read_jsonl, repair_jsonl


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_repair_cuts_only_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": ')
    assert repair_jsonl(path) == 6
    assert [r["a"] for r in read_jsonl(path)] == [1, 2]
    assert repair_jsonl(path) == 0


def _append_many(path, worker, count):
    for n in range(count):
        append_jsonl(path, {"worker": worker, "n": n, "pad": "x" * 5000})


def test_concurrent_appends_stay_valid_jsonl(tmp_path):
    path = tmp_path / "results.jsonl"
    procs = [multiprocessing.Process(target=_append_many, args=(path, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 200 and len({(r["worker"], r["n"]) for r in records}) == 200


def test_key_depends_on_everything_that_changes_frames():
    base = dict(image_sha256="a" * 64, params={"fps": 7}, seed=1, model={"source": "tiny"}, preprocess={"resize": "crop"})
    key = item_key(**base)
    assert item_key(**base) == key
    for change in ({"image_sha256": "b" * 64}, {"params": {"fps": 6}}, {"seed": 2}, {"model": {"source": "svd"}},
                   {"preprocess": {"resize": "pad"}}):
        assert item_key(**{**base, **change}) != key


def test_unwritable_run_dir_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(RunDirError, match="not writable"):
        RunStore(blocker / "run", "mp4").prepare()


def test_finished_index_skips_an_unreadable_line_and_keeps_the_rest(tmp_path):
    store = RunStore(tmp_path, "mp4")
    store.prepare()
    store.results.write_text('{"id": "a", "key": "1"}\n{"id": "b", "ke\n{"id": "c", "key": "3"}\n[1, 2]\n')
    assert sorted(store.finished_index()) == ["a", "c"]
