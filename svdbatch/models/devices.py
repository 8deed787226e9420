"""Devices and threads as torch sees them: run.devices resolved, thread counts pinned, dtypes.

Imported where torch is loaded already: in worker processes, and in callers that run a
worker in-process (the test suite, notebooks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from svdbatch.core.config import ModelConfig
from svdbatch.core.errors import ConfigError
from svdbatch.models.identity import dtype_name


def parse_device(name: Any) -> torch.device:
    """One entry of run.devices: a GPU index (0), or a device name ("cuda:1", "cpu")."""
    try:
        return torch.device("cuda", name) if isinstance(name, int) else torch.device(str(name))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"run.devices: {name!r} is not a device ({exc})") from None


def resolve_devices(devices: Any, workers: int = 1, environ: Mapping[str, str] | None = None) -> list[torch.device]:
    """One entry per worker process.

    "auto": every visible GPU (or, under torchrun/accelerate, the GPU of this LOCAL_RANK);
    without CUDA, `workers` CPU workers. An int n: GPUs 0..n-1. A list: those devices.
    A device that is not there is a config mistake (ConfigError, exit 2), not a load failure.
    """
    environ = os.environ if environ is None else environ
    cuda = torch.cuda.is_available()
    if devices == "auto" or devices is None:
        if not cuda:
            return [torch.device("cpu")] * max(1, workers)
        if "LOCAL_RANK" in environ:  # one process per GPU is already the launcher's job
            return [torch.device("cuda", int(environ["LOCAL_RANK"]))]
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    if isinstance(devices, int) and not isinstance(devices, bool):
        names: list[Any] = list(range(devices))
    elif isinstance(devices, str):
        names = [devices]
    else:
        names = list(devices)
    if not names:
        raise ConfigError("run.devices is empty")
    resolved = []
    for name in names:
        device = parse_device(name)
        if device.type == "cuda" and not cuda:
            raise ConfigError(f"run.devices={devices!r} asks for a GPU but CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"run.devices: {device} does not exist ({torch.cuda.device_count()} GPUs visible)")
        resolved.append(device)
    return resolved


def pin_threads(num_threads: int | None) -> None:
    """Set this process's intra-op thread count (None or 0: leave torch's). It changes float
    results, so every worker pins the run's count and reproduce pins the recorded one."""
    if num_threads:
        torch.set_num_threads(num_threads)


def resolve_dtype(model: ModelConfig, device: torch.device | str) -> torch.dtype:
    return getattr(torch, dtype_name(model, device))
