"""Driver overhead: svdbatch vs the loop a user would write by hand with diffusers.

Same items, same seeds, same tiny model on the CPU. Each repeat times, back to back:
  baseline     load the pipeline once, loop: open + resize, pipe(...), export_to_video
  svdbatch     run(cfg) into a fresh run dir: validation, hashing, keys, sidecars, logs,
               load/write overlap (pipeline load included, like the baseline)
  batch=4      the same with run.batch_size=4
  workers=2    two worker processes (1 thread each) on the 2 cores
and prints medians and ratios to the baseline.

    python bench/overhead.py [--items 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from svdbatch.core.compose import config_dir
from svdbatch.core.params import resolve_params
from svdbatch.engine.driver import run
from svdbatch.inputs.manifest import read_manifest
from svdbatch.models import loading as models
from svdbatch.models import tiny


def make_manifest(root: Path, count: int, size: tuple[int, int] = (160, 120), first_seed: int = 1000) -> Path:
    """count noise PNGs of size (width, height) and their CSV manifest (the other benchmarks use it too)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["id,image,seed"]
    rng = np.random.default_rng(0)
    for n in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / "img" / f"{n}.png")
        rows.append(f"i{n},img/{n}.png,{first_seed + n}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def config(manifest: Path, run_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"manifest={manifest}", f"run.dir={run_dir}", "run.progress=false", *extra],
        )


def baseline(manifest: Path, out: Path) -> None:
    """What a user writes by hand, following the diffusers guide."""
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import export_to_video

    cfg = config(manifest, out)
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny.ensure_tiny_model(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    for item in read_manifest(manifest).items:
        params = resolve_params(cfg.conditioning, cfg.model, cfg.memory, item.overrides).as_dict()
        image = Image.open(item.image).convert("RGB").resize((params["width"], params["height"]))
        frames = pipe(image, generator=torch.Generator("cpu").manual_seed(item.seed), **params).frames[0]
        export_to_video(frames, str(out / f"{item.id}.mp4"), fps=params["fps"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    models.quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="svdbatch-bench-overhead-"))
    try:
        manifest = make_manifest(root, args.items)
        tiny.ensure_tiny_model()
        variants = {
            "baseline": lambda out: baseline(manifest, out),
            "svdbatch": lambda out: run(config(manifest, out)),
            "batch=4": lambda out: run(config(manifest, out, "run.batch_size=4")),
            "workers=2": lambda out: run(config(manifest, out, "run.workers=2", "run.num_threads=1")),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        baseline(manifest, root / "warm-up")  # first-call costs (imports, allocator) off the clock
        for repeat in range(args.repeats):
            for name, variant in variants.items():
                models._loaded.clear()  # every variant pays its own pipeline load
                out = root / f"{name.replace('=', '')}-{repeat}"  # no "=" in a Hydra override value
                times[name].append(timed(lambda: variant(out)))
                shutil.rmtree(out, ignore_errors=True)
        base = statistics.median(times["baseline"])
        print(f"{args.items} items, tiny model, {torch.get_num_threads()} threads, median of {args.repeats} repeats")
        print(f"{'variant':<10} {'median s':>9} {'s/item':>7} {'vs baseline':>12}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<10} {median:9.2f} {median / args.items:7.3f} {median / base:11.3f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
