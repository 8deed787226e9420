"""Fault injection for tests: make a run die or fail at a named point, on purpose.

    SVDBATCH_FAULT=<stage>:<n>[:<action>]     e.g. SVDBATCH_FAULT=video:2:kill

The n-th time (`<n>+`: the n-th time and every time after it) this process reaches
`stage`, `action` happens: kill (SIGKILL itself, the default: no cleanup, no flush;
in a worker process only that worker dies), killrun
(SIGKILL the whole run: the driver, then this process; other workers die with the driver,
like a node losing power), enospc (a disk-full OSError),
oom (a CUDA out-of-memory error), error (a RuntimeError) or nan (only at `frames`: the
pipeline's output is made NaN, as an fp16 overflow does; models/rescue.py). Unset, a fault point costs one
dict lookup. Stages, in the order an item passes them:

    generate      just before the pipeline call
    frames        the pipeline's output of one video, before it is checked for NaN
    encode        the encoder has finished writing the temporary, before it is decoded back
    video         the video is fully written to its temporary name and checked, not yet renamed
    sidecar       the video is in place; the sidecar is written to its temporary name
    results       the sidecar is in place; the results.jsonl line is not yet appended
    metadata      at the end of a run, metadata.jsonl is written to its temporary name
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections import Counter

FAULT_ENV = "SVDBATCH_FAULT"
STAGES = ("generate", "frames", "encode", "video", "sidecar", "results", "metadata")
ACTIONS = ("kill", "killrun", "enospc", "oom", "error", "nan")

_reached: Counter[str] = Counter()
_driver_pid: int | None = None  # set in a worker process: killrun kills the driver too


def set_driver(pid: int) -> None:
    global _driver_pid
    _driver_pid = pid


def parse_fault(spec: str | None) -> tuple[str, int, str, bool] | None:
    """(stage, n, action, and every time after the n-th too)."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("kill")
    if len(parts) != 3:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <stage>:<n>[:<action>]")
    stage, nth, action = parts
    onwards = nth.endswith("+")
    nth = nth.removesuffix("+")
    if stage not in STAGES or not nth.isdigit() or action not in ACTIONS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <stage>:<n>[:<action>], stage in {STAGES}, action in {ACTIONS}")
    return stage, int(nth), action, onwards


def fault_point(stage: str) -> str | None:
    """Act on the fault this process was given, if it is due here. Returns "nan" where the
    caller must make its output NaN, else None (the other actions never return)."""
    fault = parse_fault(os.environ.get(FAULT_ENV))
    if fault is None or fault[0] != stage:
        return None
    _reached[stage] += 1
    if _reached[stage] != fault[1] and not (fault[3] and _reached[stage] > fault[1]):
        return None
    action = fault[2]
    if action == "nan":
        return action
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "killrun":
        if _driver_pid is not None:
            os.kill(_driver_pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {stage})")
    if action == "oom":
        # Only generation points inject an OOM, and torch is loaded there: take its error
        # class from it rather than importing torch into every module that has a fault point.
        raise sys.modules["torch"].OutOfMemoryError(f"CUDA out of memory (injected at {stage})")
    raise RuntimeError(f"injected failure at {stage}")
