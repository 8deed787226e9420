"""Run-dir bookkeeping: atomic writes, torn-line repair, keys."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from svdbatch.core.atomic import atomic_path, atomic_write_bytes
from svdbatch.core.errors import RunDirError
from svdbatch.rundir import record_writer, records, summaries
from svdbatch.rundir.keys import item_key
from svdbatch.rundir.store import RunStore

from .runfiles import sidecar_file


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_a_torn_last_line_of_a_killed_writer_is_not_a_record(tmp_path):
    folder = tmp_path / records.RECORDS_DIR
    folder.mkdir()
    (folder / f"0001-h-1{records.RESULTS_SUFFIX}").write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": ')
    assert [r["id"] for r in records.read_results(tmp_path)] == ["a", "b"]
    summary = dict(summaries.summaries(tmp_path))["0001-h-1"]
    assert summary.commits == 2 and summary.results_bytes == len(b'{"id": "a"}\n{"id": "b"}\n')


def _append_many(root, worker, count):
    for n in range(count):
        record_writer.writer(root).append_result({"id": f"{worker}-{n}", "worker": worker, "n": n, "pad": "x" * 5000})
    record_writer.flush_all()


def test_concurrent_writers_append_to_files_of_their_own(tmp_path):
    procs = [multiprocessing.Process(target=_append_many, args=(tmp_path, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    found = records.read_results(tmp_path)
    assert len(found) == 200 and len({(r["worker"], r["n"]) for r in found}) == 200
    assert len(list((tmp_path / records.RECORDS_DIR).glob("*" + records.RESULTS_SUFFIX))) == 4
    assert summaries.totals(tmp_path).done == 200


def test_key_depends_on_everything_that_changes_frames():
    base = dict(image_sha256="a" * 64, params={"fps": 7}, seed=1, model={"source": "tiny"}, preprocess={"resize": "crop"})
    key = item_key(**base)
    assert item_key(**base) == key
    for change in (
        {"image_sha256": "b" * 64},
        {"params": {"fps": 6}},
        {"seed": 2},
        {"model": {"source": "svd"}},
        {"preprocess": {"resize": "pad"}},
    ):
        assert item_key(**{**base, **change}) != key


def test_unwritable_run_dir_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(RunDirError, match="not writable"):
        RunStore(blocker / "run", "mp4").prepare()


def test_finished_index_skips_an_unreadable_line_and_keeps_the_rest(tmp_path):
    store = RunStore(tmp_path, "mp4")
    store.prepare()
    (tmp_path / "results.jsonl").write_text('{"id": "a", "key": "1"}\n{"id": "b", "ke\n{"id": "c", "key": "3"}\n[1, 2]\n')
    assert sorted(store.finished_index()) == ["a", "c"]


def test_deleting_only_a_sidecar_redoes_the_item_and_status_does_not_count_it(tmp_path, images):
    from svdbatch.engine.driver import run
    from svdbatch.reports.status import collect

    from .conftest import make_cfg, write_csv

    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2]])
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")
    assert run(cfg).done == 2
    (sidecar_file(run_dir, "a")).unlink()  # the video and its results line are still there
    assert collect(run_dir)["counts"]["done"] == 1

    again = run(cfg)
    assert (again.done, again.skipped) == (1, 1)
    assert json.loads((sidecar_file(run_dir, "a")).read_text())["status"] == "done"
    assert sorted(json.loads(line)["id"] for line in (run_dir / "metadata.jsonl").read_text().splitlines()) == ["a", "b"]
    assert collect(run_dir)["counts"]["done"] == 2


def test_a_sidecar_of_another_size_than_committed_is_not_trusted(tmp_path):
    store = RunStore(tmp_path, "mp4")
    store.prepare()
    store.video_path("a").write_bytes(b"v" * 10)
    store.sidecar_path("a").parent.mkdir(parents=True, exist_ok=True)
    store.sidecar_path("a").write_bytes(b"{}")
    output = store.relative(store.video_path("a"))
    record = {"id": "a", "key": "k", "output_key": "o", "output": output, "output_bytes": 10, "sidecar_bytes": 2}
    assert store.is_done("a", "k", "o", {"a": record})
    assert not store.is_done("a", "k", "other output settings", {"a": record})
    store.sidecar_path("a").write_bytes(b"{ }")
    assert not store.is_done("a", "k", "o", {"a": record})
