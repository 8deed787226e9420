"""Which items of a run dir are finished: the records every writer keeps (records.py), read
whole for a small run (latest line per id, output and sidecar intact) and through the writers'
summaries for a big one (status.FAST_FROM); both must agree. Plus parse_jsonl's edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svdbatch.core.jsonl import parse_jsonl
from svdbatch.reports import status
from svdbatch.rundir import record_writer, records, summaries
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.layout import FLAT, LAYOUT_FILE, item_relpath, layout_version, sidecar_relpath
from svdbatch.rundir.store import RunStore


def record(root: Path, item_id: str, n: int, output_bytes: int = 100, sidecar_bytes: int = 40, **extra) -> dict:
    return {
        "id": item_id,
        "output": item_relpath("videos", f"{item_id}.mp4", item_id, layout_version(root)),
        "output_bytes": output_bytes,
        "sidecar_bytes": sidecar_bytes,
        "finished_at": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}+00:00",
        "seconds": 1.5,
        **extra,
    }


def make_files(root: Path, item_id: str, output_bytes: int = 100, sidecar_bytes: int = 40) -> None:
    layout = layout_version(root)
    video = root / item_relpath("videos", f"{item_id}.mp4", item_id, layout)
    sidecar = root / sidecar_relpath(item_id, layout)
    for path, size in ((video, output_bytes), (sidecar, sidecar_bytes)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def write_records(root: Path, writer: str, lines: list) -> None:
    """lines: records (dicts) or raw bytes (a damaged line), as one writer's file."""
    folder = root / records.RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    (folder / f"{writer}{records.RESULTS_SUFFIX}").write_bytes(data)


def done_ids(root: Path) -> set[str]:
    return {i for i, r in records.latest_results(root).items() if output_intact(root, r)}


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / LAYOUT_FILE).write_text('{"version": 2}')
    (tmp_path / "config.yaml").write_text("manifest: m.csv\n")
    return tmp_path


def test_latest_line_per_id_across_writers_decides(root):
    for n in range(6):
        make_files(root, f"i{n}")
    write_records(root, "0001-a-1", [record(root, f"i{n}", n) for n in range(3)])
    write_records(root, "0002-b-2", [record(root, f"i{n}", n) for n in range(3, 6)] + [record(root, "i0", 9, output_bytes=7)])
    assert done_ids(root) == {f"i{n}" for n in range(1, 6)}  # i0's later line (another writer) wins
    assert [r["id"] for r in records.read_results(root)][:3] == ["i0", "i1", "i2"]  # oldest writer first


def test_truncated_sidecars_and_deleted_videos_are_not_done(root):
    for n in range(10):
        make_files(root, f"i{n}")
    write_records(root, "0001-a-1", [record(root, f"i{n}", n) for n in range(10)])
    (root / sidecar_relpath("i1")).write_bytes(b"x" * 39)
    (root / item_relpath("videos", "i3.mp4", "i3", 2)).unlink()
    assert done_ids(root) == {f"i{n}" for n in range(10)} - {"i1", "i3"}


@pytest.mark.parametrize("damaged", [b'{"id": "torn", "output": "vid', b"\xff\xfe not utf-8", b"[1, 2]", b"42"])
def test_a_damaged_line_in_the_middle_is_skipped_and_the_rest_counted(root, damaged):
    lines: list = []
    for n in range(30):
        make_files(root, f"i{n}")
        lines.append(record(root, f"i{n}", n))
    lines.insert(15, damaged)
    write_records(root, "0001-a-1", lines)
    assert done_ids(root) == {f"i{n}" for n in range(30)}
    assert summaries.totals(root).done == 30


def test_summaries_follow_the_records_they_do_not_cover_yet(root):
    writer = record_writer.writer(root)
    for n in range(5):
        writer.append_result(record(root, f"i{n}", n))
    writer.flush()
    covered = json.loads(writer.summary_path.read_bytes())["results_bytes"]
    assert covered == writer.results_path.stat().st_size
    for n in range(5, 8):  # appended, not flushed yet (a killed writer leaves it so)
        writer.append_result(record(root, f"i{n}", n))
    assert json.loads(writer.summary_path.read_bytes())["results_bytes"] == covered
    assert summaries.totals(root).done == 8 and summaries.totals(root).last_id == "i7"
    writer.summary_path.unlink()  # lost: rebuilt from the records
    assert summaries.totals(root).done == 8
    writer.append_result(record(root, "i1", 9, redo=True))  # a redo: no new item
    writer.append_result(record(root, "i2", 10, meta_updated_at="x"))  # a meta_* update: no finish
    writer.append_result({"id": "i3", "removed": True})  # verify --repair set it aside
    totals = summaries.totals(root)
    assert (totals.done, totals.commits) == (7, 11)
    assert [r["finished_at"] for r in totals.recent][-2:] == [
        record(root, "i7", 7)["finished_at"],
        record(root, "i1", 9)["finished_at"],
    ]


def test_status_counts_the_same_from_summaries_and_from_every_record(root, monkeypatch):
    ids = [f"i{n}" for n in range(12)]
    (root / "m.csv").write_text("id,image\n" + "".join(f"{i},{i}.png\n" for i in ids))
    (root / "config.yaml").write_text(f"manifest: {root / 'm.csv'}\n")
    for i in ids:
        (root / f"{i}.png").write_bytes(b"not read by status")
    for n in range(8):
        make_files(root, f"i{n}")
    write_records(root, "0001-a-1", [record(root, f"i{n}", n) for n in range(5)])
    write_records(root, "0002-b-2", [record(root, f"i{n}", n) for n in range(5, 8)])
    (root / records.RECORDS_DIR / f"0002-b-2{records.FAILURES_SUFFIX}").write_text(
        json.dumps({"id": "i9", "error": "RuntimeError: boom", "time": "2026-01-01T00:00:00+0000"}) + "\n"
    )
    store = RunStore(root, "mp4")
    store.prepare()
    claim = store.claim("i10")
    try:
        monkeypatch.setattr(status, "FAST_FROM", 10**9)
        exact = status.collect(root)
        monkeypatch.setattr(status, "FAST_FROM", 0)
        counted = status.collect(root)
    finally:
        store.release(claim)
    assert (
        exact["counts"]
        == counted["counts"]
        == {
            "done": 8,
            "duds": 0,
            "in_progress": 1,
            "failed": 1,
            "invalid": 0,
            "pending": 2,
            "total": 12,
            "done_not_in_manifest": 0,
        }
    )
    assert exact["reasons"] == counted["reasons"] and exact["in_progress_ids"] == counted["in_progress_ids"] == ["i10"]
    assert exact["throughput"] == counted["throughput"]


def test_an_old_run_dirs_results_jsonl_is_read_as_it_is_and_summarised_once(tmp_path):
    (tmp_path / "items").mkdir()  # a run dir of an older version: flat, one shared log
    assert layout_version(tmp_path) == FLAT
    lines = []
    for n in range(4):
        make_files(tmp_path, f"i{n}")
        lines.append(record(tmp_path, f"i{n}", n))
    lines.append(record(tmp_path, "i0", 5))  # a second line of one id: still one item
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert done_ids(tmp_path) == {"i0", "i1", "i2", "i3"}
    assert summaries.totals(tmp_path).done == 4
    RunStore(tmp_path, "mp4").prepare()  # a resume writes the old log's summary, flat layout kept
    assert json.loads((tmp_path / LAYOUT_FILE).read_text())["version"] == FLAT
    assert (tmp_path / records.RECORDS_DIR / "legacy.summary.json").is_file()
    assert summaries.totals(tmp_path).done == 4


def test_a_missing_or_empty_log_is_nothing_done(root):
    make_files(root, "a")  # files without a results line do not count
    assert done_ids(root) == set() and summaries.totals(root).done == 0
    write_records(root, "0001-a-1", [])
    assert done_ids(root) == set() and summaries.totals(root).done == 0


def test_parse_jsonl_edge_cases():
    a, b = {"id": "a"}, {"id": "b", "n": 1}
    text = json.dumps(a).encode() + b"\n" + json.dumps(b).encode()
    assert parse_jsonl(text) == [a, b]  # no trailing newline
    assert parse_jsonl(text + b"\n") == [a, b]
    assert parse_jsonl(b"\n\n" + text.replace(b"\n", b"\n  \n\n") + b"\n\n") == [a, b]  # blank lines
    assert parse_jsonl(b"") == [] and parse_jsonl(b"\n") == []
    assert parse_jsonl(text + b'\n[1]\n"s"\n') == [a, b]  # JSON that is not a record


def test_parse_jsonl_names_a_damaged_line(caplog):
    data = b'{"id": "a"}\n\n{"id": "b"\n{"id": "c"}\n'
    assert parse_jsonl(data, Path("/run/results.jsonl")) == [{"id": "a"}, {"id": "c"}]
    assert [r.getMessage() for r in caplog.records] == ["/run/results.jsonl:3: skipping unreadable line"]
