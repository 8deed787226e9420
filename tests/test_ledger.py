"""dispatch.Ledger: the batch bookkeeping both engines (local pool, Ray) share."""

from __future__ import annotations

import torch

from svdbatch.core.config import OutputFormat
from svdbatch.core.outcomes import DONE, FAILED, STOPPED, Outcome
from svdbatch.engine.dispatch import MAX_ATTEMPTS, Ledger
from svdbatch.engine.plan import make_batches, plan_run
from svdbatch.inputs.manifest import read_manifest
from svdbatch.models.identity import model_identity
from svdbatch.rundir.store import RunStore
from tests.conftest import make_cfg, make_image, write_csv

from .runfiles import failures_of


def planned(tmp_path, count: int):
    for n in range(count):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{n}", f"img/{n}.png", n] for n in range(count)])
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={tmp_path / 'run'}")
    store = RunStore(tmp_path / "run", OutputFormat.mp4)
    store.prepare()
    identity = model_identity(cfg.model, torch.device("cpu"))
    plan = plan_run(read_manifest(manifest).items, cfg.conditioning, cfg.model, cfg.memory, identity.as_dict(), store, None, None)
    return make_batches(plan.todo, 1), store


def test_a_dead_workers_batches_go_elsewhere_once_then_to_failures(tmp_path):
    batches, store = planned(tmp_path, 3)
    seen: list[Outcome] = []
    ledger = Ledger(batches, store, seen.extend, per_worker=2)
    ledger.join("a")
    ledger.join("b")
    assert ledger.hand_out("a") == [0, 1] and ledger.hand_out("b") == [2]
    ledger.died("a", "SIGKILL")
    assert ledger.hand_out("b") == [0]  # b holds 2 and 0; 1 waits its turn
    ledger.done("b", 2, [Outcome("i2", DONE)])
    assert ledger.hand_out("b") == [1]
    ledger.died("b", "SIGKILL")  # 0 and 1 now had MAX_ATTEMPTS tries
    assert not ledger.keep_going() and ledger.complete
    failed = {o.item_id for o in seen if o.status == FAILED}
    assert failed == {"i0", "i1"} and MAX_ATTEMPTS == 2
    records = failures_of(store.root)
    assert sorted(r["id"] for r in records) == ["i0", "i1"]
    assert all("died (SIGKILL), 2 attempts" in r["error"] for r in records)
    ledger.died("b", "again")  # a second report of the same death changes nothing
    ledger.done("b", 1, [Outcome("i1", DONE)])  # nor does a late report after giving up
    assert len(seen) == 3


def test_a_worker_that_never_loaded_costs_no_attempt_and_leftovers_are_settled(tmp_path):
    batches, store = planned(tmp_path, 3)
    seen: list[Outcome] = []
    ledger = Ledger(batches, store, seen.extend, per_worker=2)
    ledger.join("a")
    ledger.join("b")
    ledger.hand_out("a")
    ledger.load_failed("a", "ModelLoadError: no weights")
    assert ledger.attempts[:2] == [0, 0] and list(ledger.waiting) == [0, 1, 2]
    assert ledger.hand_out("b") == [0, 1]
    ledger.done("b", 0, [Outcome("i0", STOPPED, error="disk full")])
    assert ledger.stop_reason == "disk full" and ledger.hand_out("b") == []  # nothing new after a stop
    assert ledger.keep_going()  # batch 1 is still out
    ledger.done("b", 1, [Outcome("i1", STOPPED, error="disk full")])
    assert not ledger.keep_going()
    ledger.settle()
    assert [o.status for o in seen] == [STOPPED] * 3 and ledger.complete
