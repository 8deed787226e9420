"""`svdbatch status`: counts from a real run dir, claims, failure grouping, throughput, ETA."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import svdbatch
from svdbatch.commands import status as status_command
from svdbatch.reports.progress import eta_seconds, throughput
from svdbatch.reports.reasons import group_reasons, normalise_error, normalise_problem
from svdbatch.reports.status_counts import claimed_ids, classify
from svdbatch.rundir.claims import STALE_AFTER_S, release, take
from svdbatch.rundir.store import RunStore
from tests.conftest import FAST, make_image, run_cli, write_csv, write_jsonl

from .runfiles import video_file

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cache) -> Path:
    """A real run of 4 rows: a, b done; c's PNG is truncated (fails at load); d's video is
    deleted afterwards (pending again). The manifest path is relative to the run's cwd."""
    root = tmp_path_factory.mktemp("status")
    for n, name in enumerate("abcd"):
        make_image(root / "img" / f"{name}.png", seed=n)
    whole = (root / "img" / "c.png").read_bytes()
    (root / "img" / "c.png").write_bytes(whole[: len(whole) // 2])
    write_csv(root / "m.csv", ["id", "image", "seed"], [[n, f"img/{n}.png", i] for i, n in enumerate("abcd")])
    run = root / "run"
    proc = run_cli(
        "manifest=m.csv",
        f"hydra.run.dir={run}",
        "run.check_images=false",
        "run.num_threads=1",
        "run.progress=false",
        *FAST,
        cwd=root,
    )
    assert proc.returncode == 1, proc.stderr  # one item failed
    (video_file(run, "d", ".mp4")).unlink()
    return run


def test_status_of_a_real_run(run_dir):
    proc = run_cli("status", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert lines["done"][1] == "2" and lines["failed"][1] == "1" and lines["pending"][1] == "1"
    assert lines["invalid"][1] == "0" and lines["in"][2] == "0"  # 'in progress'
    assert "(4 rows)" in proc.stdout  # m.csv found relative to the cwd the run was started from
    assert "OSError: image file is truncated  (e.g. c)" in proc.stdout
    assert "items/h" in proc.stdout


def test_status_json_counts_a_held_claim_as_in_progress(run_dir):
    store = RunStore(run_dir, "mp4")
    claim = store.claim("d")  # as a worker generating d would
    try:
        proc = run_cli("status", str(run_dir), "--json")
    finally:
        store.release(claim)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["counts"] == {
        "done": 2,
        "in_progress": 1,
        "failed": 1,
        "invalid": 0,
        "pending": 0,
        "total": 4,
        "done_not_in_manifest": 0,
        "duds": 0,  # done items that broke a quality rule (docs/quality.md)
    }
    assert report["in_progress_ids"] == ["d"]
    assert report["reasons"] == [
        {
            "reason": "OSError: image file is truncated",
            "count": 1,
            "example_id": "c",
            "example": "OSError: image file is truncated",
        }
    ]
    assert report["throughput"]["items"] == 3 and report["throughput"]["items_per_hour"] > 0
    assert report["live"] is True and report["eta_s"] is not None  # a held claim: a run is going on


def test_not_a_run_dir_exits_2(tmp_path, capsys):
    assert status_command([str(tmp_path)]) == 2
    assert "is not a run dir" in capsys.readouterr().err
    (tmp_path / "sweep" / "point=1").mkdir(parents=True)
    (tmp_path / "sweep" / "point=1" / "results.jsonl").write_text("")
    assert status_command([str(tmp_path / "sweep")]) == 2
    assert "run dirs inside it: point=1" in capsys.readouterr().err
    assert status_command([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_manifest_leaves_pending_unknown_and_counts_invalid_rows_from_the_log(tmp_path):
    (tmp_path / "config.yaml").write_text("manifest: gone/m.csv\n")
    write_jsonl(
        tmp_path / "failures.jsonl",
        [
            {
                "id": None,
                "error": "invalid manifest row",
                "line": 3,
                "problems": ["m.csv:3: field 'seed': must be an integer, got 'x'"],
            },
            {
                "id": None,
                "error": "invalid manifest row",
                "line": 3,
                "problems": ["m.csv:3: field 'seed': must be an integer, got 'x'"],
            },
            {
                "id": "q",
                "error": "invalid manifest row",
                "line": 5,
                "problems": ["m.csv:5: field 'seed': must be an integer, got 'y'"],
            },
            {"id": "r", "error": "RuntimeError: boom"},
        ],
    )
    report = svdbatch.status(tmp_path)
    assert report["manifest"]["error"] == "manifest gone/m.csv not found"
    counts = report["counts"]
    assert (counts["pending"], counts["total"], counts["invalid"], counts["failed"]) == (None, None, 2, 1)
    assert [(r["reason"], r["count"]) for r in report["invalid_reasons"]] == [("field 'seed': must be an integer, got '…'", 2)]
    assert report["eta_s"] is None


# -- pure parts -----------------------------------------------------------------------
def test_a_claim_is_in_progress_while_its_holder_lives_here_or_beats_elsewhere(tmp_path):
    claims = tmp_path / "claims"
    claims.mkdir()
    claim = take(claims, "x")
    assert claim is not None and set(claimed_ids(tmp_path)) == {"x"}
    assert take(claims, "x") is None  # held by a live process: busy
    release(claim)
    assert claimed_ids(tmp_path) == set() and not list(claims.iterdir())  # released claims are deleted
    far = {"host": "elsewhere", "pid": 1, "token": "t"}
    (claims / "y.claim").write_text(json.dumps(far))
    assert claimed_ids(tmp_path) == {"y"}  # another host's pid means nothing here: its heartbeat is fresh
    old = datetime.now().timestamp() - STALE_AFTER_S - 1
    os.utime(claims / "y.claim", (old, old))
    assert claimed_ids(tmp_path) == set()  # missed heartbeats: stale
    taken = take(claims, "y")
    assert taken is not None and json.loads((claims / "y.claim").read_text())["token"] == taken.token


def test_classify_puts_every_row_in_one_class():
    failures = {
        "c": {"id": "c", "error": "OSError: x"},
        "e": {"id": "e", "error": "invalid manifest row"},
        "a": {"id": "a", "error": "old"},
    }
    counts = classify(
        ["a", "b", "c", "d", "e", "f"], [(9, None, ["bad"])], done={"a", "z"}, failures=failures, claimed={"d", "a"}
    )
    assert counts.done == {"a"} and counts.extra_done == {"z"}  # done wins over an older failure and a claim
    assert counts.in_progress == {"d"} and counts.failed == {"c"}
    assert sorted(counts.invalid) == ["e", "line 9"] and counts.pending == {"b", "f"}
    assert counts.as_dict()["total"] == 7


def test_normalise_error_removes_particulars():
    assert normalise_error("UnidentifiedImageError: cannot identify image file '/data/x 1.png'") == (
        "UnidentifiedImageError: cannot identify image file '…'"
    )
    assert normalise_error("FetchError: https://h.org/a.jpg?x=1: HTTP 404") == "FetchError: <url>: HTTP #"
    assert (
        normalise_error("OSError: [Errno 2] No such file: /tmp/run/videos/a.mp4\nmore")
        == "OSError: [Errno #] No such file: <path>"
    )
    assert normalise_error("RuntimeError: CUDA out of memory. Tried to allocate 2.50 GiB") == (
        "RuntimeError: CUDA out of memory. Tried to allocate # GiB"
    )
    assert normalise_error("") == "(no message)"
    assert normalise_problem("/m/x.csv:12: field 'seed': must be an integer in [0, 2**64), got '-1'") == (
        "field 'seed': must be an integer in [#, #**#), got '…'"
    )


def test_group_reasons_most_frequent_first_with_one_example():
    reasons = group_reasons(
        [
            ("a", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
            ("b", "OSError: image file is truncated (3 bytes not processed)"),
            ("c", "RuntimeError: CUDA out of memory. Tried to allocate 4.00 GiB"),
            ("d", "OSError: image file is truncated (9 bytes not processed)"),
            ("e", "RuntimeError: CUDA out of memory. Tried to allocate 1.00 GiB"),
            ("f", "ValueError: odd"),
        ]
    )
    assert [(r.count, r.example_id) for r in reasons] == [(3, "a"), (2, "b"), (1, "f")]
    assert reasons[0].example == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def finished(offset_s: float, seconds: float = 60.0) -> dict:
    return {"finished_at": (T0 + timedelta(seconds=offset_s)).isoformat(timespec="seconds"), "seconds": seconds}


def test_throughput_is_wall_clock_over_the_latest_session():
    one_worker = [finished(60 * n) for n in range(1, 11)]  # 10 items, one a minute
    rate = throughput(one_worker)
    assert rate.items == 10 and rate.items_per_hour == pytest.approx(60.0) and rate.mean_item_s == 60.0
    two_workers = [finished(60 * n) for n in range(1, 11) for _ in range(2)]  # items overlap
    assert throughput(two_workers).items_per_hour == pytest.approx(120.0)
    yesterday = [finished(60 * n - 86400, seconds=5.0) for n in range(100)]  # another session: left out
    assert throughput(yesterday + one_worker).items == 10
    assert throughput(one_worker, window=4).items == 4
    same_second = [finished(0, seconds=2.0)] * 3  # second-resolution stamps: span from the item's own time
    assert throughput(same_second).items_per_hour == pytest.approx(3 * 3600 / 2.0)
    assert throughput([]).items_per_hour is None
    assert throughput([{"finished_at": "2026-01-01T00:00:00+0000", "seconds": 1}]).items == 1  # '+0000' offsets parse


def test_eta():
    assert eta_seconds(30, 60.0) == pytest.approx(1800.0)
    assert eta_seconds(0, None) == 0.0
    assert eta_seconds(30, None) is None and eta_seconds(None, 60.0) is None
    assert eta_seconds(30, 60.0, live=False) is None  # a stopped run has no ETA


def test_status_of_a_copied_run_dir_without_its_manifest(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".hydra"))  # no record of the run's cwd
    report = svdbatch.status(copy)
    assert report["counts"]["done"] == 2 and report["counts"]["pending"] is None
    assert "manifest m.csv not found" in report["manifest"]["error"]
