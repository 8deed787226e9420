"""Time per sweep: worker processes kept between sequential sweep points vs restarted
(and the pipeline reloaded) at every point, as before.

A sweep of P points over conditioning.motion_bucket_id, each point generating the same
items with run.workers=W CPU worker processes (the multi-device code path), run in this
process exactly like Hydra's basic launcher runs its jobs:
  kept       the driver's sweep mode: one spawn + load per worker for the whole sweep
  reloaded   the crew is shut down after every point: P spawns + loads per worker
Prints seconds per sweep, loads counted from the workers' own reports, and the ratio.

    python bench/sweep.py [--points 4] [--items 2] [--workers 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from overhead import make_manifest  # noqa: E402  (bench/overhead.py: sys.path[0] is bench/)

from svdbatch.core.compose import config_dir
from svdbatch.core.config_checks import run_config
from svdbatch.engine import crews, driver


class LoadCounter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.loads = 0

    def emit(self, record: logging.LogRecord) -> None:
        # models.loading's "loaded <model> (<dtype>, <device>) in <s> s", prefixed
        # "worker <n>: " when several workers forward their records (crews.log_from_worker).
        if re.search(r"(^|: )loaded \S+ \(", record.getMessage()):
            self.loads += 1


def one_sweep(manifest: Path, out: Path, points: int, count_workers: int, keep: bool) -> float:
    driver.in_hydra_sweep = lambda: keep  # what a Hydra multirun job sees (keep) or not
    start = time.perf_counter()
    for point in range(points):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    f"manifest={manifest}",
                    f"run.dir={out / f'p{point}'}",
                    "run.progress=false",
                    "run.gallery=false",
                    f"run.workers={count_workers}",
                    "run.num_threads=1",
                    f"conditioning.motion_bucket_id={20 + 40 * point}",
                    "conditioning.width=64",
                    "conditioning.height=64",
                    "conditioning.num_frames=4",
                    "conditioning.num_inference_steps=2",
                ],
            )
        driver.run(run_config(cfg))  # as svdbatch.run does (driver.in_hydra_sweep is patched above)
    crews.close_crews()  # the end of the sweep (atexit in the real command)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    counter = LoadCounter()
    # Worker processes' records are re-emitted under their own logger names (crews.log_from_worker):
    # listen on the package logger, where every one of them passes.
    logging.getLogger("svdbatch").addHandler(counter)
    logging.getLogger("svdbatch").setLevel(logging.INFO)
    scratch = Path(tempfile.mkdtemp(prefix="svdbatch-bench-sweep-"))
    try:
        manifest = make_manifest(scratch / "data", args.items, size=(64, 64))
        times: dict[str, list[float]] = {"kept": [], "reloaded": []}
        loads: dict[str, int] = {}
        for repeat in range(args.repeats):
            for variant in ("reloaded", "kept"):
                counter.loads = 0
                times[variant].append(
                    one_sweep(manifest, scratch / f"{variant}{repeat}", args.points, args.workers, variant == "kept")
                )
                loads[variant] = counter.loads
        print(
            f"{args.points} points x {args.items} items, run.workers={args.workers}, tiny model 64x64x4, 2 steps, "
            f"median of {args.repeats}"
        )
        print(f"{'variant':<10}{'s/sweep':>9}{'loads':>7}")
        for variant in ("reloaded", "kept"):
            print(f"{variant:<10}{statistics.median(times[variant]):>9.2f}{loads[variant]:>7}")
        ratio = statistics.median(times["reloaded"]) / statistics.median(times["kept"])
        print(f"kept workers: {ratio:.2f}x faster per sweep than reloading at every point")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
