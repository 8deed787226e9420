"""What a worker is built from, as plain picklable data (sent to worker processes and Ray actors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain picklable data."""

    model: dict[str, Any]
    memory: dict[str, Any]
    output: dict[str, Any]
    run_dir: str
    # None: models.default_num_threads for the resolved devices, worked out by the first
    # worker of an early crew and then given to every worker (it changes float results).
    num_threads: int | None
    step_progress: bool
    context: dict[str, Any]
    retry_on_oom: bool = False
    # run.keep_replaced: where a redone item's older output is moved before the new one is written.
    keep_replaced_in: str | None = None
    # run.devices and run.workers as configured: the first worker of an early crew resolves them.
    devices: Any = "auto"
    workers: int = 1
    # The quality group (core/quality.QualityConfig as a dict): rules and redoes of duds.
    quality: dict[str, Any] | None = None
