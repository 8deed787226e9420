"""Outputs derived from the run dir (metadata.jsonl, WebDataset shards, gallery, sweep page,
summary) hold exactly what the run dir holds, after any mix of shards, limits, redos,
meta_* edits and faults: never one process's view of it."""

from __future__ import annotations

import json
import tarfile
import threading
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

import svdbatch
from svdbatch import run
from svdbatch.reports.progress import throughput
from svdbatch.reports.sweep_page import write_sweep_page
from svdbatch.rundir.dataset import sample_key, write_dataset
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.store import RunStore
from svdbatch.rundir.verify import verify_run_dir
from tests.conftest import make_cfg, make_image, write_csv

from .runfiles import video_file, video_rel

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
    return make_cfg(f"manifest={manifest}", f"run.dir='{run_dir}'", "run.num_threads=1", "run.gallery=false", *extra)


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


@pytest.mark.parametrize("fault", ["encode:1:error", "video:1:enospc", "sidecar:1:enospc", "sidecar:1:error"])
def test_a_failed_redo_moves_nothing_and_the_exports_stay_true(tmp_path, six, monkeypatch, fault):
    """docs/resume.md: a redo that fails keeps the old output in place (and listed)."""
    manifest, rows = six
    rows = rows[:2]
    write_csv(manifest, HEADER, rows)
    run_dir = tmp_path / "run"
    assert run(cfg_for(manifest, run_dir, "output.webdataset=true")).done == 2
    before = {p.relative_to(run_dir): p.read_bytes() for p in (*run_dir.glob("videos/*/*"), *run_dir.glob("items/*/*"))}

    rows[0][2] = 99  # a new seed for a: a redo
    write_csv(manifest, HEADER, rows)
    monkeypatch.setenv("SVDBATCH_FAULT", fault)
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    redo = run(cfg_for(manifest, run_dir, "output.webdataset=true"))
    assert redo.done == 0 and (redo.failed == 1 or redo.stop_reason)
    monkeypatch.delenv("SVDBATCH_FAULT")
    after = {p.relative_to(run_dir): p.read_bytes() for p in (*run_dir.glob("videos/*/*"), *run_dir.glob("items/*/*"))}
    assert after == before  # the old video and sidecar, in place
    assert not [p for p in run_dir.rglob("replaced/**/*") if p.is_file()]
    write_dataset(RunStore(run_dir, "mp4"))  # what any later process would write (a stopped run writes none)
    assert metadata(run_dir)["a"]["seed"] == 1
    assert_exports_match_run_dir(run_dir)
    assert verify_run_dir(run_dir) and not [r for r in verify_run_dir(run_dir) if r.damaged or r.notes]

    again = run(cfg_for(manifest, run_dir, "output.webdataset=true"))  # and the redo then goes through
    assert (again.done, again.failed) == (1, 0)
    assert metadata(run_dir)["a"]["seed"] == 99
    assert_exports_match_run_dir(run_dir)
    [kept] = (run_dir / "replaced").iterdir()
    assert (kept / video_rel(run_dir, "a")).read_bytes() == before[Path(video_rel(run_dir, "a"))]


def test_meta_edits_update_sidecars_and_exports_without_regenerating(tmp_path, six):
    manifest, rows = six
    rows = rows[:3]
    write_csv(manifest, HEADER, rows)
    run_dir = tmp_path / "run"
    assert run(cfg_for(manifest, run_dir, "output.webdataset=true")).done == 3
    videos = {p.name: p.read_bytes() for p in (run_dir / "videos").glob("*/*")}

    rows[0][3] = "a new caption"  # same length as before or not: both must be seen
    rows[2][3] = "caption X"
    write_csv(manifest, HEADER, rows)
    edited = run(cfg_for(manifest, run_dir))  # without output.webdataset: the shards follow anyway
    assert (edited.done, edited.skipped, edited.meta_updated) == (0, 1, 2)
    assert "2 metadata updated" in edited.line()
    assert {p.name: p.read_bytes() for p in (run_dir / "videos").glob("*/*")} == videos  # nothing regenerated
    assert [metadata(run_dir)[i]["meta_caption"] for i in ("a", "b.v2", "c")] == ["a new caption", "caption 1", "caption X"]
    assert RunStore(run_dir, "mp4").read_sidecar("a").row.meta == {"meta_caption": "a new caption"}
    assert samples(run_dir)["a"]["json"]["meta_caption"] == "a new caption"
    assert_exports_match_run_dir(run_dir)
    assert not [r for r in verify_run_dir(run_dir) if r.damaged]

    again = run(cfg_for(manifest, run_dir))  # nothing left to update
    assert (again.done, again.skipped, again.meta_updated) == (0, 3, 0)
    # A removed meta value is an edit too.
    rows[1][3] = None
    write_csv(manifest, HEADER, rows)
    assert run(cfg_for(manifest, run_dir)).meta_updated == 1
    assert metadata(run_dir)["b.v2"]["meta_caption"] is None
    assert_exports_match_run_dir(run_dir)


class Links(HTMLParser):
    """The relative src/data-src URLs of a page, and its card classes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.cards: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        found = dict(attrs)
        for name in ("src", "data-src", "poster"):
            if found.get(name):
                self.urls.append(unquote(found[name]))
        if tag == "article":
            self.cards.append(found.get("class", ""))


def assert_every_derived_output_is_true(run_dir: Path) -> None:
    """metadata.jsonl, shards, gallery and status agree with what is done in the run dir."""
    assert_exports_match_run_dir(run_dir)
    done = set(metadata(run_dir))
    page = Links()
    page.feed((run_dir / "index.html").read_text(encoding="utf-8"))
    assert page.cards.count("card done") == len(done)
    assert [u for u in page.urls if not (run_dir / u).exists()] == []  # no link to a missing file
    assert svdbatch.status(run_dir)["counts"]["done"] == len(done)
    assert not [r for r in verify_run_dir(run_dir) if r.damaged and r.item_id in done]  # a deleted video is not listed


def test_derived_outputs_stay_true_through_shards_limits_redos_edits_and_faults(tmp_path, six, monkeypatch):
    manifest, rows = six
    run_dir = tmp_path / "run"
    exports = ("output.webdataset=true", "output.shard_size=2", "run.gallery=true")

    def step(*extra: str, fault: str | None = None):
        if fault:
            monkeypatch.setenv("SVDBATCH_FAULT", fault)
            monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
        summary = run(cfg_for(manifest, run_dir, *exports, *extra))
        monkeypatch.delenv("SVDBATCH_FAULT", raising=False)
        assert_every_derived_output_is_true(run_dir)
        return summary

    step("run.shard.index=1", "run.shard.count=2")
    step("run.limit=2")
    step("run.shard.index=0", "run.shard.count=2")
    assert len(metadata(run_dir)) == 6

    rows[2][2] = 30  # c redone: the disk fills while its video is written
    write_csv(manifest, HEADER, rows)
    stopped = step(fault="video:1:enospc")
    assert stopped.stop_reason and metadata(run_dir)["c"]["seed"] == 3

    rows[0][3] = "edited"  # a's caption, c again, and d redone, in one run whose d fails at its sidecar
    rows[3][2] = 40
    write_csv(manifest, HEADER, rows)
    mixed = step(fault="sidecar:2:error")
    assert (mixed.done, mixed.failed, mixed.meta_updated) == (1, 1, 1)
    assert [metadata(run_dir)[i]["seed"] for i in ("c", "d")] == [30, 4]
    assert metadata(run_dir)["a"]["meta_caption"] == "edited"

    (video_file(run_dir, "f", ".mp4")).unlink()  # a user deletes a video; a one-item smoke run follows
    step("run.limit=1")
    assert "f" not in metadata(run_dir) and sample_key("f") not in samples(run_dir)

    final = step()  # everything catches up
    assert (final.done, final.failed) == (2, 0) and len(metadata(run_dir)) == 6


class Cells(Links):
    def handle_starttag(self, tag: str, attrs: list) -> None:
        super().handle_starttag(tag, attrs)
        if tag == "td":
            self.cards.append(dict(attrs).get("class", ""))


def test_the_sweep_page_shows_what_each_point_holds_after_shards_redos_edits_and_faults(tmp_path, six, monkeypatch):
    """A sweep root of two points (as Hydra lays it out), each run by hand through shards, a
    failed redo and a meta edit: the comparison page has one done cell per finished item of
    each point, and links only files that exist."""
    manifest, rows = six
    rows = rows[:4]
    write_csv(manifest, HEADER, rows)
    root = tmp_path / "sweep"
    points = {"60": root / "conditioning.motion_bucket_id=60", "180": root / "conditioning.motion_bucket_id=180"}
    for value, point in points.items():
        (point / ".hydra").mkdir(parents=True)
        (point / ".hydra" / "overrides.yaml").write_text(f"- conditioning.motion_bucket_id={value}\n")

    def run_point(value: str, *extra: str) -> None:
        run(cfg_for(manifest, points[value], f"conditioning.motion_bucket_id={value}", "run.reuse=false", *extra))

    def check() -> None:
        page = Cells()
        page.feed(write_sweep_page(root).read_text(encoding="utf-8"))
        done = sum(len(metadata(point)) for point in points.values() if (point / "metadata.jsonl").exists())
        assert page.cards.count("cell done") == done
        assert [u for u in page.urls if not (root / u).exists()] == []

    run_point("60", "run.shard.index=0", "run.shard.count=2")
    run_point("180", "run.limit=1")
    check()
    run_point("60", "run.shard.index=1", "run.shard.count=2")
    rows[1][2] = 20  # b.v2 redone at 60; its video write fails
    rows[0][3] = "edited"
    write_csv(manifest, HEADER, rows)
    monkeypatch.setenv("SVDBATCH_FAULT", "encode:1:error")
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    run_point("60")
    monkeypatch.delenv("SVDBATCH_FAULT")
    check()
    assert metadata(points["60"])["a"]["meta_caption"] == "edited" and metadata(points["60"])["b.v2"]["seed"] == 2
    run_point("180")
    check()


def test_a_metadata_update_line_is_not_counted_as_a_finish():
    finishes = [{"id": f"i{n}", "finished_at": f"2026-12-01T10:00:{n:02d}+00:00", "seconds": 1.0} for n in range(4)]
    edit = {**finishes[0], "meta_updated_at": "2026-12-02T00:00:00+00:00"}  # a later line of i0, same finish
    assert throughput([*finishes, edit]) == throughput(finishes)
