"""Process-wide settings svdbatch applies only to processes it owns: the CLI's own process
and the worker processes (and Ray actors) it starts. Never on import: a program that imports
svdbatch keeps its own environment, Pillow limit and csv settings (svdbatch checks its limits
per call instead: images.open_image, manifest.csv_field_limit).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# torch's OpenMP threads spin while they wait for their siblings. On a CPU that other jobs
# share, a descheduled sibling leaves the others spinning: a tiny 64x64 item took ~30 s with
# 2 spinning threads and ~0.2 s with sleeping ones on a loaded 2-core machine
# (bench/threads.py). How threads wait never changes a result. OpenMP reads the variable when
# torch loads it, so it must be in the environment before that; a value already set wins.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The WORKER_ENV variables as a process svdbatch starts should have them: the value in
    `environ` (default: this process's) where it sets one, else svdbatch's default."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name, value) for name, value in WORKER_ENV.items()}


def own_process() -> None:
    """In a process svdbatch owns (the CLI, a worker it spawned), before torch loads: its
    environment defaults, inherited by the processes it starts in turn."""
    os.environ.update(worker_env())
