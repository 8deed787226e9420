"""Bookkeeping at scale: manifest validation throughput and resume planning time.

Generates a manifest of N rows (default 100k) pointing at N small distinct files, marks all
but 1% of them done in a run dir (fake outputs with the right keys, sizes and sidecars),
then times, in one process:
  * validation without image decoding (rows/s)
  * planning: resolve params, look up image hashes, decide done vs to-do (seconds)

    python bench/plan.py [--rows 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from svdbatch.core.compose import config_dir
from svdbatch.engine.plan import plan_run
from svdbatch.inputs.manifest import read_manifest
from svdbatch.models.devices import resolve_devices
from svdbatch.models.identity import model_identity
from svdbatch.rundir import records
from svdbatch.rundir.sidecar import result_record
from svdbatch.rundir.store import RunStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--done-fraction", type=float, default=0.99)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="svdbatch-bench-plan-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        bench(root, args.rows, args.done_fraction)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def fake_done(store: RunStore, entries) -> None:
    """Mark planned entries finished as a run would have (10-byte videos, minimal sidecars,
    results lines), so a resume can be planned and timed without generating anything."""
    # One records file, as one writer process would have left it (rundir/records.py).
    with (store.records / f"0000000000000-bench-0{records.RESULTS_SUFFIX}").open("w") as results:
        for entry in entries:
            video = store.video_path(entry.item.id)
            video.write_bytes(b"v" * 10)
            sidecar = {
                "id": entry.item.id,
                "key": entry.key,
                "output_key": entry.output_key,
                "status": "done",
                "seed": entry.item.seed,
                "image": entry.image_record(),
                "frames_sha256": "",
                "finished_at": "2026-01-01T00:00:00+00:00",
                "output": {"path": store.relative(video), "bytes": 10},
                "timings": {"total_s": 1.0},
            }
            body = json.dumps(sidecar).encode()
            sidecar_path = store.sidecar_path(entry.item.id)
            sidecar_path.parent.mkdir(exist_ok=True)
            sidecar_path.write_bytes(body)
            results.write(json.dumps(result_record(sidecar, len(body))) + "\n")


def bench(root: Path, rows: int, done_fraction: float) -> None:
    images = root / "img"
    images.mkdir(exist_ok=True)
    manifest = root / "manifest.csv"
    with manifest.open("w") as handle:
        handle.write("id,image,seed,motion_bucket_id\n")
        for n in range(rows):
            (images / f"{n}.png").write_bytes(n.to_bytes(8, "big") * 8)  # distinct bytes per file
            handle.write(f"item{n},img/{n}.png,{n},{n % 256}\n")

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"manifest={manifest}", f"run.dir={root / 'run'}"])

    start = time.perf_counter()
    items = read_manifest(manifest, check_images=False).items
    validate_s = time.perf_counter() - start

    store = RunStore(root / "run", cfg.output.format)
    store.prepare()
    identity = model_identity(cfg.model, resolve_devices("auto")[0]).as_dict()
    # Fake a run that finished all but the last (1 - done_fraction) of the items.
    plan = plan_run(items, cfg.conditioning, cfg.model, cfg.memory, identity, store, output=cfg.output)
    done_count = int(rows * done_fraction)
    fake_done(store, plan.todo[:done_count])

    start = time.perf_counter()
    plan = plan_run(items, cfg.conditioning, cfg.model, cfg.memory, identity, store, output=cfg.output)
    plan_s = time.perf_counter() - start
    assert len(plan.done) == done_count and len(plan.todo) == rows - done_count, (len(plan.done), len(plan.todo))

    print(f"rows: {rows}, already done: {done_count}")
    print(f"validate (no image decode): {validate_s:.2f} s = {rows / validate_s:,.0f} rows/s  (target >= 50,000 rows/s)")
    print(f"plan resume (hash lookup + keys + done check): {plan_s:.2f} s  (target < 2 s)")


if __name__ == "__main__":
    main()
