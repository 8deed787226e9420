"""Several svdbatch processes on one run dir share the work through per-item claims:
every item is generated exactly once, by whichever process claims it first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

from svdbatch.store import RunStore

from .conftest import FAST, REPO, make_image, write_csv


def test_a_claim_excludes_other_holders_until_released(tmp_path):
    store = RunStore(tmp_path, "mp4")
    store.prepare()
    first = store.claim("a")
    assert first is not None
    assert store.claim("a") is None  # flock: a second open file description cannot take it
    assert store.claim("b") is not None
    store.release(first)
    again = store.claim("a")
    assert again is not None
    store.release(again)


def test_a_claim_dies_with_its_process(tmp_path):
    store = RunStore(tmp_path, "mp4")
    store.prepare()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from svdbatch.store import RunStore; "
         "s = RunStore(sys.argv[1], 'mp4'); assert s.claim('a') is not None; print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert store.claim("a") is None
    holder.kill()
    holder.wait()
    claim = store.claim("a")  # the kernel dropped the dead holder's lock: no stale claims
    assert claim is not None
    store.release(claim)


def test_two_runs_on_one_run_dir_share_the_work(tmp_path):
    n = 8
    for i in range(n):
        make_image(tmp_path / "img" / f"i{i}.png", seed=i)
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[f"i{i}", f"img/i{i}.png", i] for i in range(n)])
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "svdbatch", f"manifest={manifest}", *FAST, "conditioning.num_inference_steps=4",
               "run.num_threads=1", f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HYDRA_FULL_ERROR": "0"}) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    done = [int(re.search(r"(\d+) done", out).group(1)) for out, _ in outputs]
    assert sum(done) == n  # nobody generated an item twice, nothing was left out
    lines = (run_dir / "results.jsonl").read_bytes().splitlines()
    assert Counter(json.loads(line)["id"] for line in lines) == Counter({f"i{i}": 1 for i in range(n)})
    assert not (run_dir / "failures.jsonl").exists()
