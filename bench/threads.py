"""Seconds per item of the tiny model at 64x64 for several intra-op thread settings, each in
a fresh process (OpenMP reads its environment once), and the ratio to the first setting.

    python bench/threads.py [items]

Run it on the machine you care about, idle and under its usual load: on a shared CPU,
OpenMP threads that spin-wait for a descheduled sibling make several threads far slower
than one; svdbatch's default lets them sleep instead (OMP_WAIT_POLICY=PASSIVE)."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = r"""
import sys, time, torch
from svdbatch.models.identity import default_num_threads
from svdbatch.models.loading import load_pipeline
from svdbatch.core.config import ModelConfig, MemoryConfig
from omegaconf import OmegaConf
from PIL import Image
threads = int(sys.argv[1]) or default_num_threads([torch.device("cpu")])
torch.set_num_threads(threads)
pipe = load_pipeline(OmegaConf.structured(ModelConfig), OmegaConf.structured(MemoryConfig), torch.device("cpu")).pipe
pipe.set_progress_bar_config(disable=True)
image = Image.new("RGB", (64, 64), "gray")
call = lambda: pipe(image, width=64, height=64, num_frames=4, num_inference_steps=2, decode_chunk_size=4,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np")
call()  # warm-up
start = time.perf_counter()
for _ in range(int(sys.argv[2])):
    call()
print(threads, (time.perf_counter() - start) / int(sys.argv[2]))
"""


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    # torch imports first in the child, so svdbatch's own OMP_WAIT_POLICY default does not
    # apply there: each setting says what it uses.
    settings = [
        ("torch default", str(os.cpu_count() or 1), {}),  # all cores, OpenMP's spinning wait
        ("svdbatch default", "0", {"OMP_WAIT_POLICY": "PASSIVE"}),  # usable cores / workers, sleeping wait
        ("1 thread", "1", {}),
    ]
    results = []
    for name, threads, env in settings:
        base_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, threads, str(items)],
            capture_output=True,
            text=True,
            env={**base_env, **env},
            check=True,
        ).stdout.split()
        results.append((name, int(out[0]), float(out[1])))
    base = results[0][2]
    for name, threads, seconds in results:
        print(f"{name:<18} {threads:>3} threads  {seconds:6.2f} s/item  ratio {seconds / base:5.2f}")


if __name__ == "__main__":
    main()
