"""store.finished_intact: which ids of a results log are done (latest line's output and sidecar
intact), serially and with the log's second half checked in a forked child, plus the
log-tail helpers it uses (last_lines_start, parse_jsonl)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import svdbatch.rundir.store as store
from svdbatch.core.jsonl import parse_jsonl
from svdbatch.rundir.store import RESULTS, VIDEOS_DIR, finished_intact, last_lines_start, sidecar_relpath

BIG = 1 << 62  # FORK_FROM_BYTES that no test log reaches: serial


def record(item_id: str, n: int, output_bytes: int = 100, sidecar_bytes: int = 40) -> dict:
    return {
        "id": item_id,
        "output": f"{VIDEOS_DIR}/{item_id}.mp4",
        "output_bytes": output_bytes,
        "sidecar_bytes": sidecar_bytes,
        "finished_at": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}+00:00",
        "seconds": 1.5,
    }


def make_files(run_dir: Path, item_id: str, output_bytes: int = 100, sidecar_bytes: int = 40) -> None:
    video, sidecar = run_dir / VIDEOS_DIR / f"{item_id}.mp4", run_dir / sidecar_relpath(item_id)
    for path, size in ((video, output_bytes), (sidecar, sidecar_bytes)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def intact_items(run_dir: Path, numbers) -> list[dict]:
    """Records i<n> for each n, with their video and sidecar written at the recorded sizes."""
    for n in numbers:
        make_files(run_dir, f"i{n}")
    return [record(f"i{n}", n) for n in numbers]


def write_log(run_dir: Path, lines: list) -> bytes:
    """lines: records (dicts) or raw bytes (a damaged line), one per line."""
    data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    (run_dir / RESULTS).write_bytes(data)
    return data


class ForkSpy:
    """Wraps store.start_forked and store._check_part to record whether the child really ran,
    which ids it decided (the log's second half) and which ids this process checked."""

    def __init__(self, monkeypatch):
        self.forked: list[bool] = []
        self.child_ids: list[list[str]] = []
        self.parent_ids: list[list[str]] = []
        real_start, real_check = store.start_forked, store._check_part

        def start_forked(work):
            waiter = real_start(work)
            self.forked.append(waiter is not None)
            if waiter is None:
                return None

            def wait():
                value = waiter()
                self.child_ids.append(None if value is None else list(value[0]))
                return value

            return wait

        def check_part(root, data):
            value = real_check(root, data)
            self.parent_ids.append(list(value[0]))  # the child's calls are not seen here
            return value

        monkeypatch.setattr(store, "start_forked", start_forked)
        monkeypatch.setattr(store, "_check_part", check_part)


class OnlyThisThread:
    """store.threading as seen with no other thread running. A daemon thread an earlier test
    left in this pytest process (tqdm's monitor, once any progress bar ran) would keep
    start_forked from forking, and these tests from testing the forked path."""

    def __getattr__(self, name):
        return getattr(threading, name)

    @staticmethod
    def active_count() -> int:
        return 1


def both_ways(run_dir: Path, monkeypatch, recent: int = 0) -> tuple:
    """finished_intact serially and forked on the same run dir; asserts they agree and the fork ran."""
    monkeypatch.setattr(store, "FORK_FROM_BYTES", BIG)
    serial = finished_intact(run_dir, recent)
    monkeypatch.setattr(store, "threading", OnlyThisThread())
    spy = ForkSpy(monkeypatch)
    monkeypatch.setattr(store, "FORK_FROM_BYTES", 1)
    forked = finished_intact(run_dir, recent)
    assert spy.forked == [True], "the second half was not checked in a forked child"
    assert spy.child_ids and spy.child_ids[0] is not None, "the child returned no result"
    assert len(spy.parent_ids) == 1, "this process also checked the second half (fallback ran)"
    assert forked == serial
    return serial, spy


def test_forked_check_equals_the_serial_check(tmp_path, monkeypatch):
    lines = intact_items(tmp_path, range(40))
    write_log(tmp_path, lines)
    (done, recent), spy = both_ways(tmp_path, monkeypatch, recent=5)
    assert done == {f"i{n}" for n in range(40)}
    assert [r["id"] for r in recent] == [f"i{n}" for n in range(35, 40)]
    # Both halves really were split between the two processes, none checked twice.
    first, second = set(spy.parent_ids[0]), set(spy.child_ids[0])
    assert first and second and not first & second and first | second == done


def test_the_latest_line_decides_across_the_halves(tmp_path, monkeypatch):
    lines = [record("redone_bad", 0, output_bytes=100), record("redone_good", 1, output_bytes=999)]
    for n in range(2, 30):
        make_files(tmp_path, f"i{n}")
        lines.append(record(f"i{n}", n))
    # The files on disk match the first line of redone_bad and the latest line of redone_good.
    make_files(tmp_path, "redone_bad", output_bytes=100)
    make_files(tmp_path, "redone_good", output_bytes=100)
    lines += [record("redone_bad", 30, output_bytes=555), record("redone_good", 31, output_bytes=100)]
    write_log(tmp_path, lines)
    (done, _), spy = both_ways(tmp_path, monkeypatch)
    assert "redone_bad" not in done
    assert "redone_good" in done
    assert done == {f"i{n}" for n in range(2, 30)} | {"redone_good"}
    # The precondition: each of them has a line in the first half and its latest in the second.
    for item_id in ("redone_bad", "redone_good"):
        assert item_id in spy.parent_ids[0] and item_id in spy.child_ids[0]


def test_an_intact_first_half_line_is_not_overruled_by_nothing(tmp_path, monkeypatch):
    """An id only in the first half is decided there (the child does not know it)."""
    lines = intact_items(tmp_path, range(20))
    write_log(tmp_path, lines)
    (done, _), spy = both_ways(tmp_path, monkeypatch)
    assert "i0" in spy.parent_ids[0] and "i0" not in spy.child_ids[0]
    assert "i0" in done


def test_truncated_sidecars_and_deleted_videos_in_either_half_are_not_done(tmp_path, monkeypatch):
    lines = intact_items(tmp_path, range(40))
    write_log(tmp_path, lines)
    broken = {"i1": "sidecar", "i3": "video", "i36": "sidecar", "i38": "video"}
    for item_id, what in broken.items():
        if what == "sidecar":
            path = tmp_path / sidecar_relpath(item_id)
            path.write_bytes(path.read_bytes()[:-1])  # truncated by one byte
        else:
            (tmp_path / VIDEOS_DIR / f"{item_id}.mp4").unlink()
    (done, _), spy = both_ways(tmp_path, monkeypatch)
    assert done == {f"i{n}" for n in range(40)} - set(broken)
    assert {"i1", "i3"} <= set(spy.parent_ids[0]) and {"i36", "i38"} <= set(spy.child_ids[0])


def test_a_sidecar_that_grew_is_not_done_either(tmp_path, monkeypatch):
    make_files(tmp_path, "a", sidecar_bytes=41)  # committed with 40
    make_files(tmp_path, "b")
    write_log(tmp_path, [record("a", 0), record("b", 1)])
    monkeypatch.setattr(store, "FORK_FROM_BYTES", BIG)
    assert finished_intact(tmp_path)[0] == {"b"}


@pytest.mark.parametrize("damaged", [b'{"id": "torn", "output": "vid', b"\xff\xfe not utf-8", b"[1, 2]", b"42"])
def test_a_damaged_line_in_the_middle_is_skipped_and_the_rest_counted(tmp_path, monkeypatch, damaged):
    lines = intact_items(tmp_path, range(30))
    lines.insert(15, damaged)
    write_log(tmp_path, lines)
    (done, recent), _ = both_ways(tmp_path, monkeypatch, recent=40)
    assert done == {f"i{n}" for n in range(30)}
    assert [r["id"] for r in recent] == [f"i{n}" for n in range(30)]


@pytest.mark.parametrize("count", [1, 3, 10])
def test_recent_is_the_last_records_in_order(tmp_path, monkeypatch, count):
    lines = intact_items(tmp_path, range(10))
    lines.append(record("i2", 10, output_bytes=7))  # a later line of an id: recent has both
    write_log(tmp_path, lines)
    (_, recent), _ = both_ways(tmp_path, monkeypatch, recent=count)
    assert recent == lines[-count:]


def test_recent_larger_than_the_log_and_zero(tmp_path, monkeypatch):
    make_files(tmp_path, "a")
    lines = [record("a", 0), record("b", 1)]
    write_log(tmp_path, lines)
    monkeypatch.setattr(store, "FORK_FROM_BYTES", BIG)
    assert finished_intact(tmp_path, recent=100) == ({"a"}, lines)
    assert finished_intact(tmp_path, recent=0) == ({"a"}, [])
    assert finished_intact(tmp_path) == ({"a"}, [])


def test_a_missing_log_is_nothing_done(tmp_path, monkeypatch):
    make_files(tmp_path, "a")  # files without a results line do not count
    for limit in (BIG, 1):
        monkeypatch.setattr(store, "FORK_FROM_BYTES", limit)
        assert finished_intact(tmp_path, recent=10) == (set(), [])


def test_an_empty_log_is_nothing_done(tmp_path, monkeypatch):
    (tmp_path / RESULTS).write_bytes(b"")
    for limit in (BIG, 1):
        monkeypatch.setattr(store, "FORK_FROM_BYTES", limit)
        assert finished_intact(tmp_path, recent=10) == (set(), [])


@pytest.mark.parametrize("failure", ["returns None", "start refused"])
def test_a_failed_child_falls_back_to_this_process(tmp_path, monkeypatch, failure):
    lines = intact_items(tmp_path, range(30))
    lines.append(record("i0", 30, output_bytes=3))  # latest line of i0, in the second half: bad
    make_files(tmp_path, "i29", sidecar_bytes=1)  # second half, broken
    write_log(tmp_path, lines)
    monkeypatch.setattr(store, "FORK_FROM_BYTES", BIG)
    expected = finished_intact(tmp_path, recent=4)
    assert expected[0] == {f"i{n}" for n in range(1, 29)}
    started = []

    def broken_start(work):
        started.append(work)
        return (lambda: None) if failure == "returns None" else None

    monkeypatch.setattr(store, "start_forked", broken_start)
    monkeypatch.setattr(store, "FORK_FROM_BYTES", 1)
    assert finished_intact(tmp_path, recent=4) == expected
    assert len(started) == 1


def test_start_forked_returns_the_childs_result_and_none_when_it_raises(monkeypatch):
    monkeypatch.setattr(store, "threading", OnlyThisThread())
    waiter = store.start_forked(lambda: ({"a": [1, 2]}, "b"))
    assert waiter is not None and waiter() == ({"a": [1, 2]}, "b")

    def fails():
        raise RuntimeError("child fails")

    waiter = store.start_forked(fails)
    assert waiter is not None and waiter() is None


# -- last_lines_start, parse_jsonl --------------------------------------------------------
@pytest.mark.parametrize("data", [b"a\nb\nc\n", b"a\nb\nc", b"a\nb\nc\n\n\n"])
def test_last_lines_start_with_and_without_trailing_newlines(data):
    assert data[last_lines_start(data, 1) :].strip(b"\n") == b"c"
    assert data[last_lines_start(data, 2) :].strip(b"\n") == b"b\nc"
    assert last_lines_start(data, 3) == 0
    assert last_lines_start(data, 50) == 0


def test_last_lines_start_of_empty_and_one_line():
    assert last_lines_start(b"", 5) == 0
    assert last_lines_start(b"only", 1) == 0
    assert last_lines_start(b"only\n", 1) == 0


def test_last_lines_start_counts_blank_lines_in_the_middle():
    data = b"a\n\nb\n"
    assert data[last_lines_start(data, 1) :] == b"b\n"
    assert data[last_lines_start(data, 2) :] == b"\nb\n"
    assert parse_jsonl(data[last_lines_start(data, 2) :]) == parse_jsonl(b"b\n")


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


def test_no_fork_while_another_thread_runs_and_the_result_is_the_same(tmp_path, monkeypatch):
    lines = intact_items(tmp_path, range(20))
    lines.append(record("i0", 20, output_bytes=1))
    write_log(tmp_path, lines)
    monkeypatch.setattr(store, "FORK_FROM_BYTES", BIG)
    expected = finished_intact(tmp_path, recent=3)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        assert store.start_forked(lambda: 1) is None  # it may hold a lock the child would inherit
        spy = ForkSpy(monkeypatch)
        monkeypatch.setattr(store, "FORK_FROM_BYTES", 1)
        assert finished_intact(tmp_path, recent=3) == expected
        assert spy.forked == [False] and len(spy.parent_ids) == 2  # both halves here
    finally:
        stop.set()
        other.join()
    assert expected[0] == {f"i{n}" for n in range(1, 20)}
