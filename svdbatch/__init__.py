"""svdbatch: declarative, resumable, reproducible batch image-to-video with Stable Video Diffusion."""

import importlib
import os

__version__ = "0.1.0"

# The public API (svdbatch/api.py, docs/api.md). Loaded on first use, so that `import
# svdbatch` stays fast: a worker process or `svdbatch status` need not import the engine.
API = ("compose", "validate", "run", "status", "verify", "reproduce", "open_run", "emit_manifest")


def __getattr__(name: str) -> object:
    if name in API:
        return getattr(importlib.import_module("svdbatch.api"), name)
    raise AttributeError(f"module 'svdbatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *API]


# torch's OpenMP threads spin while they wait for their siblings. On a CPU that other jobs
# share, a descheduled sibling leaves the others spinning: a tiny 64x64 item took ~30 s with
# 2 spinning threads and ~0.2 s with sleeping ones on a loaded 2-core machine
# (bench/threads.py). How threads wait never changes a result. OpenMP reads this when torch
# loads it, so it is set here, before any svdbatch module imports torch (worker processes
# inherit it); a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
