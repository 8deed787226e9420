"""A big run dir's resume (engine/output_check.py): finished outputs and bucket temporaries
are checked once dispatch has started, and what is missing or cut is still redone in the
same run, exactly as a small run dir's resume redoes it before starting. Here every run dir
counts as big, and every resume keeps a snapshot (rundir/resume_index.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from svdbatch import run
from svdbatch.engine import output_check
from svdbatch.rundir import resume_index
from svdbatch.rundir.store import RunStore
from tests.conftest import make_cfg, write_csv

from .runfiles import results_of, sidecar_file, video_file


@pytest.fixture(params=["background", "before"])
def mode(request, monkeypatch) -> str:
    monkeypatch.setattr(resume_index, "SAVE_AFTER_BYTES", 0)
    if request.param == "background":
        monkeypatch.setattr(output_check, "BACKGROUND_FROM_BYTES", 0)
    return request.param


def manifest_of(tmp_path: Path, seeds: dict[str, int]) -> Path:
    rows = [[item_id, f"img/{'abcd'[n % 4]}.png", seed] for n, (item_id, seed) in enumerate(seeds.items())]
    return write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)


def test_deleted_and_cut_outputs_of_finished_items_are_redone_in_the_same_run(tmp_path, images, mode):
    manifest = manifest_of(tmp_path, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")
    assert run(cfg).done == 5
    again = run(cfg)
    assert (again.done, again.skipped) == (0, 5)
    assert (run_dir / "cache" / resume_index.SNAPSHOT).is_file()

    video_file(run_dir, "a", ".mp4").unlink()
    video_c = video_file(run_dir, "c", ".mp4")
    video_c.write_bytes(video_c.read_bytes()[:100])
    sidecar_file(run_dir, "d").unlink()
    stale = video_file(run_dir, "e").with_name(".e.partial-x1y2.mp4")  # in e's bucket folder
    stale.write_bytes(b"\x00" * 10)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    manifest_of(tmp_path, {"a": 1, "b": 22, "c": 3, "d": 4, "e": 5})  # b changed: to do from the start

    summary = run(cfg)
    assert (summary.done, summary.skipped, summary.failed) == (4, 1, 0)
    assert not stale.exists()
    store = RunStore(run_dir, "mp4")
    index = store.finished_index(compact=True)
    assert index == RunStore(run_dir, "mp4").finished_index(compact=True)
    for item_id in "abcde":
        assert video_file(run_dir, item_id, ".mp4").stat().st_size == index[item_id].output_bytes
        assert sidecar_file(run_dir, item_id).stat().st_size == index[item_id].sidecar_bytes
    final = run(cfg)
    assert (final.done, final.skipped) == (0, 5)


def test_a_resume_with_nothing_left_but_a_deleted_output_redoes_it(tmp_path, images, mode):
    manifest = manifest_of(tmp_path, {"a": 1, "b": 2, "c": 3})
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")
    assert run(cfg).done == 3
    video_file(run_dir, "b", ".mp4").unlink()
    summary = run(cfg)
    assert (summary.done, summary.skipped) == (1, 2)
    assert video_file(run_dir, "b", ".mp4").is_file()
    assert [r["id"] for r in results_of(run_dir)].count("b") == 2


def test_plan_lists_what_it_did_not_check(tmp_path, images, monkeypatch):
    from svdbatch.engine.plan import plan_run
    from svdbatch.engine.prepare import load_manifest
    from svdbatch.models.identity import model_identity

    manifest = manifest_of(tmp_path, {f"i{n}": n for n in range(8)})
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")
    assert run(cfg).done == 8
    video_file(run_dir, "i2", ".mp4").unlink()
    sidecar_file(run_dir, "i5").write_bytes(b"{}")
    store = RunStore(run_dir, "mp4")
    items = load_manifest(cfg).items
    identity = model_identity(cfg.model, "cpu").as_dict()

    def plan(**kwargs):
        return plan_run(items, cfg.conditioning, cfg.model, cfg.memory, identity, store, output=cfg.output, **kwargs)

    checked, trusting = plan(keep_done=False), plan(keep_done=False, check_outputs=False)
    assert [e.item.id for e in checked.todo] == ["i2", "i5"] and not checked.unchecked and checked.index is None
    assert not trusting.todo and trusting.done_count == 8 and len(trusting.unchecked) == 8
    broken = output_check.broken_items(store, trusting.unchecked, trusting.index)
    assert [item.id for item in broken] == ["i2", "i5"]


def test_a_cli_run_redoes_a_deleted_output_with_the_workers_it_kept(tmp_path, images):
    """The CLI's driver has no torch: its worker is a process (crews.start_early), kept after
    the first items for what the checks hand back, then let go. 8 MB of records of other
    ids make the run dir big (output_check.BACKGROUND_FROM_BYTES)."""
    from tests.conftest import FAST, run_cli

    manifest = manifest_of(tmp_path, {"a": 1, "b": 2, "c": 3})
    run_dir = tmp_path / "run"
    args = (f"manifest={manifest}", f"hydra.run.dir={run_dir}", "run.gallery=false", *FAST)
    first = run_cli(*args)
    assert first.returncode == 0 and "3 done, 0 skipped" in first.stdout, first.stderr
    padding = b"".join(b'{"id": "pad%d", "key": "k", "recorded_ns": 1, "note": "%s"}\n' % (n, b"x" * 600) for n in range(14000))
    (run_dir / "records" / "0000000000001-pad-1.results.jsonl").write_bytes(padding)
    assert output_check.in_background(RunStore(run_dir, "mp4"))
    video_file(run_dir, "b", ".mp4").unlink()
    again = run_cli(*args)
    assert again.returncode == 0 and "1 done, 2 skipped, 0 failed" in again.stdout, again.stderr
    assert video_file(run_dir, "b", ".mp4").is_file()
    assert (run_dir / "cache" / resume_index.SNAPSHOT).is_file()  # 8 MB decoded: saved
