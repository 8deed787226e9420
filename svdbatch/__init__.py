"""svdbatch: declarative, resumable, reproducible batch image-to-video with Stable Video Diffusion."""

import importlib

__version__ = "0.1.0"

# The public API (svdbatch/api.py, docs/api.md). Loaded on first use, so that `import
# svdbatch` stays fast: a worker process or `svdbatch status` need not import the engine.
API = ("compose", "validate", "run", "status", "verify", "reproduce", "open_run", "emit_manifest", "score")


def __getattr__(name: str) -> object:
    if name in API:
        return getattr(importlib.import_module("svdbatch.api"), name)
    raise AttributeError(f"module 'svdbatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), *API]
