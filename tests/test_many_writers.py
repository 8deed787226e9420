"""Many writers, one run dir (issue 22): 32+ processes claim and commit items (fake videos and
sidecars, no model) while random ones are SIGKILLed and replaced, until every item is done.
Every item must be committed exactly once, and the records, summaries and claims must agree.
Nothing of this may depend on flock or on O_APPEND across processes (claims.py, records.py)."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from svdbatch.core.atomic import HOST, atomic_write_bytes
from svdbatch.core.locks import lock_or_go_on
from svdbatch.reports.status_counts import claimed_ids
from svdbatch.rundir import record_writer, records, summaries
from svdbatch.rundir.claims import STALE_AFTER_S
from svdbatch.rundir.dataset import write_dataset
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarImage, SidecarOutput, SidecarRow, Timings
from svdbatch.rundir.store import RunStore

KEY, OUT_KEY = "k" * 64, "o" * 64
PAYLOAD = b"fake video " * 20
N_ITEMS = 640
N_PROCS = 32
KILLS = 48


def fake_sidecar(store: RunStore, item_id: str, video: Path) -> Sidecar:
    return Sidecar(
        id=item_id,
        key=KEY,
        output_key=OUT_KEY,
        seed=1,
        row=SidecarRow("m.csv", 1, item_id, "x.png", 1, False, {}, None, {}),
        image=SidecarImage("x.png", "s" * 64, None, 1, 1, (64, 64)),
        preprocess={"resize": "crop"},
        params={},
        output=SidecarOutput(store.relative(video), "mp4", 7, {}, len(PAYLOAD), "h" * 64, {}, 4, 64, 64),
        frames_sha256="f" * 64,
        timings=Timings(0.01),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        config={},
        model={"name": "fake"},
        memory={},
        oom_fallback=[],
        device="cpu",
        device_name="cpu",
        num_threads=1,
        compiled=False,
        versions={},
    )


def writer(root: str, ids: list[str], seed: int) -> None:
    """One writer process: claim, write, commit, release, in its own random order."""
    store = RunStore(root, "mp4")
    order = list(ids)
    random.Random(seed).shuffle(order)
    for item_id in order:
        claim = store.claim(item_id)
        if claim is None:
            continue  # another live process has it
        try:
            if store.done_record(item_id, KEY, OUT_KEY) is not None:
                continue  # done by someone else since
            video = store.video_path(item_id)
            atomic_write_bytes(video, PAYLOAD)
            store.commit(fake_sidecar(store, item_id, video))
        finally:
            store.release(claim)
    record_writer.flush_all()
    os._exit(0)


def not_done(store: RunStore, ids: list[str]) -> list[str]:
    return [item_id for item_id in ids if store.done_record(item_id, KEY, OUT_KEY) is None]


def test_32_writers_under_random_kills_commit_every_item_exactly_once(tmp_path):
    root = tmp_path / "run"
    store = RunStore(root, "mp4")
    store.prepare()
    ids = [f"item-{n:04d}" for n in range(N_ITEMS)]
    context = multiprocessing.get_context("fork")
    rng = random.Random(22)
    started = 0

    def start() -> multiprocessing.Process:
        nonlocal started
        started += 1
        proc = context.Process(target=writer, args=(str(root), ids, started))
        proc.start()
        return proc

    deadline = time.monotonic() + 50
    procs = [start() for _ in range(N_PROCS)]
    kills = 0
    while kills < KILLS and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.01, 0.08))
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            break
        victim = rng.choice(alive)
        os.kill(victim.pid, signal.SIGKILL)  # anywhere: mid-write, mid-commit, holding claims
        kills += 1
        procs.append(start())  # a replacement, as a restarted run would be
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not proc.is_alive(), "a writer hung"
    rounds = 0
    while not_done(store, ids) and rounds < 5:  # restarts until all is done (what resume does)
        rounds += 1
        late = [start() for _ in range(4)]
        for proc in late:
            proc.join(timeout=60)
    assert kills >= 8, "the kills should land while the writers work"
    assert not_done(store, ids) == []

    # A writer killed between its sidecar rename and its results line left the item done
    # without a line: a resume's plan appends it (store.is_done, under the item's claim).
    store.prepare()  # clears stale claims and temporaries as a restarted run does
    index = store.finished_index()
    assert all(store.is_done(item_id, KEY, OUT_KEY, index) for item_id in ids)

    lines = records.read_results(root)
    assert Counter(r["id"] for r in lines) == Counter(ids)  # exactly one commit per item
    assert not [r for r in lines if r.get("redo")]  # nothing generated twice
    assert summaries.totals(root).done == N_ITEMS  # summaries (stale ones folded forward) agree
    assert claimed_ids(root) == set()  # no live claim left, stale ones of the killed are gone
    assert not list((root / "claims").rglob("*.takeover"))
    folders = Counter(p.parent.name for p in (root / "items").rglob("*.json"))
    assert len(folders) > 100 and max(folders.values()) < 30  # grouped in bucket folders
    # Every process appends to a file of its own (<start_ms>-<host>-<pid>): several committed
    # here, each through its own file. How many got to commit depends on the machine's load.
    pids = [p.name.split(".")[0].rsplit("-", 1)[1] for p in (root / "records").glob("*.results.jsonl")]
    assert len(pids) >= 2 and len(pids) == len(set(pids))


def test_claims_commits_and_exports_work_where_flock_fails(tmp_path, monkeypatch, caplog):
    """A file system without flock (NFS without lockd: ENOLCK; Lustre without -o flock:
    ENOSYS): claims and records never use it, the dataset export lock goes on without it."""

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    store = RunStore(tmp_path / "run", "mp4")
    store.prepare()
    claim = store.claim("a")
    assert claim is not None and store.claim("a") is None
    video = store.video_path("a")
    atomic_write_bytes(video, PAYLOAD)
    store.commit(fake_sidecar(store, "a", video))
    store.record_failure("b", None, "RuntimeError: x", {})
    store.release(claim)
    assert [r["id"] for r in records.read_results(store.root)] == ["a"]
    assert [r["id"] for r in records.read_failures(store.root)] == ["b"]
    write_dataset(store)  # takes the export lock: a warning, not a crash
    assert [json.loads(line)["id"] for line in (store.root / "metadata.jsonl").read_text().splitlines()] == ["a"]
    assert "does not support flock" in caplog.text
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT)
    try:
        assert lock_or_go_on(fd, "x") is False
    finally:
        os.close(fd)


def test_another_hosts_claim_is_judged_by_its_heartbeat_not_its_pid(tmp_path):
    store = RunStore(tmp_path / "run", "mp4")
    store.prepare()
    path = store.claims / "a.claim"
    path.write_text(json.dumps({"host": "node-7", "pid": 1, "process_start": 1, "token": "far"}))
    assert store.claim("a") is None  # pid 1 here is init, not that process: the heartbeat counts
    old = time.time() - STALE_AFTER_S - 5
    os.utime(path, (old, old))
    taken = store.claim("a")
    assert taken is not None  # missed heartbeats: stale, taken over
    store.release(taken)
    assert not path.exists()


@pytest.mark.parametrize("leftover", ["dead-pid", "stale-takeover"])
def test_a_killed_takers_leftovers_do_not_block_an_item(tmp_path, leftover):
    store = RunStore(tmp_path / "run", "mp4")
    store.prepare()
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    dead = {"host": HOST, "pid": proc.pid, "token": "gone"}  # a process of this host that is gone
    (store.claims / "a.claim").write_text(json.dumps(dead))
    if leftover == "stale-takeover":
        (store.claims / "a.claim.takeover").write_text(json.dumps(dead))
        assert store.claim("a") is None  # the dead taker's lock is removed, this try yields
    taken = store.claim("a")
    assert taken is not None
    store.release(taken)
