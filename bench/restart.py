"""Restarts at scale, in the default configuration, on real-size images.

Writes D distinct 1024x576 JPEGs (default 20k; noise, so they neither compress nor hash
trivially) and a manifest of N rows (default 100k; rows reuse the images), then measures,
side by side:

  first     validation + plan of the whole manifest on a fresh run dir (header checks and
            sha256 of every distinct image, on threads), in-process: rows/s
  restart   the same command once all but 1% of the items are done (faked, as bench/plan.py
            does: outputs with the right keys), from the command to the first item starting
            (a subprocess that SVDBATCH_FAULT kills at its first pipeline call); first with
            no resume snapshot (rundir/resume_index.py), then with the one that restart saved
  baseline  the same, for a 1-row manifest: the fixed cost (interpreter, torch, hydra, model)
  whole     the whole manifest on a fresh run dir, command to first item (a subprocess)
  shard     shard 0 of 8 of the same manifest on a fresh run dir, command to first item
  status    `svdbatch status` of the 100k-row run (a subprocess, so it includes start-up)

Each subprocess's driver peak RSS (VmHWM, polled from /proc) is printed with its time.

    python bench/restart.py [--rows 100000] [--distinct 20000] [--repeats 3] [--keep DIR] [--drop-caches]
    python bench/restart.py --million [--keep DIR]     # 1M rows, 1 repeat (issue 22's scale)
    python bench/restart.py --million --keep DIR --restart-only [--repeats 2]

--restart-only measures only the restart and the 1-row run, reusing DIR/run as the last
full run left it (built once: minutes at 1M); the first restart after the build has no
resume snapshot (rundir/resume_index.py) yet, the ones after it read it.

--drop-caches (root, Linux) empties the page cache before the first run, so the images are
read from disk, as a user's own photos usually are; without it they may still be in memory
from being written or from the last run.

Images go to a temporary folder (or --keep DIR, reused when run again), never the repo.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from plan import fake_done  # noqa: E402  (bench/plan.py: sys.path[0] is bench/)

from svdbatch.core.compose import config_dir  # noqa: E402
from svdbatch.engine.plan import plan_run  # noqa: E402
from svdbatch.engine.prepare import load_manifest  # noqa: E402
from svdbatch.engine.shards import Shard  # noqa: E402
from svdbatch.inputs.images import ImageCache  # noqa: E402
from svdbatch.models.devices import resolve_devices
from svdbatch.models.identity import model_identity
from svdbatch.rundir.store import RunStore  # noqa: E402

BASES = 200  # distinct encodes; every file is a base plus its own JPEG comment (distinct bytes)


def write_images(folder: Path, count: int) -> list[Path]:
    """count distinct 1024x576 JPEGs (~165 kB each). Encoding 20k would take minutes, so 200
    noise images are encoded and each file gets a unique COM segment: distinct bytes and
    hashes, a real header to parse and real pixels to decode."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{n:06d}.jpg" for n in range(count)]
    if all(p.is_file() for p in paths[-10:]):
        return paths
    rng = np.random.default_rng(0)
    bases = []
    for _ in range(min(BASES, count)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (576, 1024, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=30)
        bases.append(buffer.getvalue())
    for n, path in enumerate(paths):
        base = bases[n % len(bases)]
        comment = f"svdbatch bench image {n}".encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        path.write_bytes(base[:2] + segment + base[2:])  # right after SOI
    return paths


def write_manifest(path: Path, images: list[Path], rows: int) -> Path:
    with path.open("w") as handle:
        handle.write("id,image,seed\n")
        for n in range(rows):
            handle.write(f"item{n},{images[n % len(images)]},{n}\n")
    return path


def compose_cfg(manifest: Path, run_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=[f"manifest={manifest}", f"run.dir={run_dir}", *extra])


def first_run(manifest: Path, run_dir: Path):
    """Validation + plan as driver.run does them, on a fresh run dir (which keeps its parse
    cache, as a run's does)."""
    cfg = compose_cfg(manifest, run_dir)
    store = RunStore(run_dir, cfg.output.format)
    identity = model_identity(cfg.model, resolve_devices("auto")[0]).as_dict()
    start = time.perf_counter()
    cache = ImageCache(store.image_cache)
    items = load_manifest(cfg, Shard(), cache, parse_cache=store.cache).items
    store.prepare()
    plan = plan_run(items, cfg.conditioning, cfg.model, cfg.memory, identity, store, image_cache=cache, output=cfg.output)
    cache.flush()
    return time.perf_counter() - start, cfg, store, plan


def peak_rss_gib(pid: int, proc: subprocess.Popen) -> float:
    """The process's peak RSS (VmHWM) as last seen before it ended, polled from /proc."""
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        peak = max([peak] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")])
        time.sleep(0.1)
    return peak / 2**20


RSS: dict[str, list[float]] = {}  # driver peak RSS per measurement (GiB)


def to_first_item(manifest: Path, run_dir: Path, *extra: str, tag: str = "") -> float:
    """Seconds from starting the command to its first pipeline call (where it is killed)."""
    # The first pipeline call kills the run: the driver and its worker.
    env = {**os.environ, "SVDBATCH_FAULT": "generate:1:killrun", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "svdbatch",
        f"manifest={manifest}",
        f"hydra.run.dir={run_dir}",
        "run.progress=false",
        "run.gallery=false",
        *extra,
    ]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = peak_rss_gib(proc.pid, proc)
        proc.wait()
        seconds = time.perf_counter() - start
        err.seek(0)
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"expected the first item to be killed, got exit {proc.returncode}:\n{err.read()[-2000:]}")
    RSS.setdefault(tag, []).append(peak)
    return seconds


def status_seconds(run_dir: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "svdbatch", "status", str(run_dir), "--json"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return seconds


def median_of(repeats: int, measure) -> tuple[float, list[float]]:
    values = [measure() for _ in range(repeats)]
    return statistics.median(values), values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=20_000)
    parser.add_argument("--done-fraction", type=float, default=0.99)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (images are reused)")
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache before the first run (root)")
    parser.add_argument("--million", action="store_true", help="1,000,000 rows, 1 repeat (minutes of CPU)")
    parser.add_argument("--restart-only", action="store_true", help="restart and 1-row run on the kept run dir")
    args = parser.parse_args()
    if args.million:
        args.rows = 1_000_000
        args.repeats = args.repeats if args.restart_only else 1
    root = args.keep or Path(tempfile.mkdtemp(prefix="svdbatch-bench-restart-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.restart_only and (root / "run" / "records").is_dir():
            restart_only(root, args)
        else:
            bench(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def bench(root: Path, args) -> None:
    started = time.perf_counter()
    images = write_images(root / "img", args.distinct)
    manifest = write_manifest(root / "manifest.csv", images, args.rows)
    one_row = write_manifest(root / "one.csv", images, 1)
    print(
        f"{args.distinct} distinct 1024x576 JPEGs (~{images[0].stat().st_size // 1000} kB), {args.rows} rows "
        f"({time.perf_counter() - started:.0f} s to write); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    for name in ("run", "shard", "one", "whole"):
        shutil.rmtree(root / name, ignore_errors=True)

    if args.drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")  # page cache only; needs root
    first_s, cfg, store, plan = first_run(manifest, root / "run")
    done = int(args.rows * args.done_fraction)
    fake_done(store, plan.todo[:done])

    # The faked records came with no resume snapshot (a run keeps one up to date as it goes:
    # engine/snapshot_keeper.py): the first restart decodes them all and saves it.
    cold = to_first_item(manifest, root / "run", tag="cold")
    restart, restarts = median_of(args.repeats, lambda: to_first_item(manifest, root / "run", tag="restart"))
    baseline, baselines = median_of(args.repeats, lambda: to_first_item(one_row, root / "one", tag="one"))
    shard_runs, whole_runs = [], []
    for _ in range(args.repeats):
        shutil.rmtree(root / "shard", ignore_errors=True)  # a first run of the shard each time
        shard_runs.append(to_first_item(manifest, root / "shard", "run.shard.index=0", "run.shard.count=8", tag="shard"))
        shutil.rmtree(root / "whole", ignore_errors=True)
        whole_runs.append(to_first_item(manifest, root / "whole", tag="whole"))
    shard, whole = statistics.median(shard_runs), statistics.median(whole_runs)
    status, statuses = median_of(args.repeats, lambda: status_seconds(root / "run"))

    def show(values: list[float]) -> str:
        return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"

    print(f"rows: {args.rows}, distinct images: {args.distinct}, done before the restart: {done}; medians of {args.repeats}")
    cache = "images read from disk" if args.drop_caches else "images possibly in the page cache"
    print(
        f"first validation + plan      {first_s:6.2f} s = {args.rows / first_s:8,.0f} rows/s   (target >= 5,000 rows/s; {cache})"
    )

    def rss(tag: str) -> str:
        return f"driver peak RSS {max(RSS[tag]):.2f} GiB"

    print(f"restart, no snapshot yet     {cold:6.2f} s   {rss('cold')}   ratio {cold / baseline:.2f}x")
    print(f"restart, to first item       {restart:6.2f} s {show(restarts)}   {rss('restart')}")
    print(f"1-row run, to first item     {baseline:6.2f} s {show(baselines)}   (fixed cost: python, torch, hydra, model)")
    print(f"  restart - fixed cost       {restart - baseline:6.2f} s   ratio {restart / baseline:.2f}x (target <= 2x)")
    print(f"whole, first run             {whole:6.2f} s {show(whole_runs)}   {rss('whole')}")
    print(f"shard 0 of 8, first run      {shard:6.2f} s {show(shard_runs)}   {rss('shard')}; shard / whole {shard / whole:.2f}")
    print(f"status (subprocess)          {status:6.2f} s {show(statuses)}   (target < 1 s)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def restart_only(root: Path, args) -> None:
    """The restart (each repeat in turn, not a median: the first may build the snapshot) and
    the 1-row run, on the run dir a full bench left in `root`."""
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    restarts = [to_first_item(root / "manifest.csv", root / "run", tag="restart") for _ in range(args.repeats)]
    baseline = to_first_item(root / "one.csv", root / "one", tag="one")
    for n, (seconds, peak) in enumerate(zip(restarts, RSS["restart"], strict=True)):
        ratio = seconds / baseline
        print(f"restart {n + 1}, to first item   {seconds:6.2f} s   driver peak RSS {peak:.2f} GiB   ratio {ratio:.2f}x")
    print(f"1-row run, to first item     {baseline:6.2f} s   (fixed cost: python, torch, hydra, model)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
