"""What determines a model's weights and how a device computes with it, without torch.

The driver plans with this module (every key holds a ModelIdentity) and checks the config
with it, so it imports neither torch nor diffusers; loading lives in loading.py and devices
in devices.py.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdbatch.core.config import DType, ModelConfig
from svdbatch.models.tiny import TINY_SOURCE, ensure_tiny_model, weights_fingerprint

# A torch.device or a device name ('cuda:1', 'cpu'): this module reads only its type.
Device = Any

# A Hugging Face repo id: 'name' or 'owner/name' (letters, digits, '-', '_', '.').
HUB_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")


# -- CPU threads: how many intra-op threads each worker computes with --------------------
def cgroup_cpu_limit() -> float | None:
    """CPUs a cgroup quota allows (docker --cpus, Kubernetes limits), or None: cgroup v2's
    cpu.max ('200000 100000' = 2 CPUs, 'max' = none), else v1's cfs quota/period."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cores() -> int:
    """Physical cores this process may run on: its CPU affinity (taskset, Slurm, cpusets),
    hyper-thread siblings counted once, capped by a cgroup CPU quota. Fixed for a given
    machine and allocation, unlike the load, so the thread count built on it is too."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        cpus = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" + (topology / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    count = len(cores)
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, int(limit))
    return max(1, count)


def default_num_threads(devices: Sequence[Device]) -> int:
    """Intra-op threads per worker when run.num_threads is null: the usable physical cores
    shared out between the workers (torch's own default takes every core the machine has
    for each worker, ignoring quotas and the other workers). It changes float results, so
    it is resolved once (prepare.worker_spec) and recorded in every sidecar."""
    return max(1, usable_cores() // max(1, len(devices)))


def device_type(device: Device) -> str:
    """'cuda' or 'cpu' of a torch.device or a device name ('cuda:1'), without torch."""
    return getattr(device, "type", None) or str(device).split(":")[0]


def dtype_name(model: ModelConfig, device: Device) -> str:
    """The dtype the model computes in on this device ('float16', 'float32', ...)."""
    requested = DType(model.dtype)
    if requested is DType.auto:
        return "float16" if device_type(device) == "cuda" else "float32"
    if device_type(device) == "cpu" and requested is not DType.float32:
        warnings.warn(
            f"model.dtype={requested.value} on CPU is slow and partly unsupported; using float32 instead",
            stacklevel=2,
        )
        return "float32"
    return requested.value


@dataclass(frozen=True)
class ModelIdentity:
    """What determines the weights: part of every item's key."""

    name: str
    source: str
    revision: str | None
    variant: str | None
    dtype: str
    fingerprint: str | None  # weight hash for the tiny model

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def only_variant_weights(source: str, variant: str) -> bool:
    """A local pipeline folder whose weight files are all `<name>.<variant>.<ext>` (e.g. a
    copy downloaded with `--include "*.fp16.safetensors"`): loading it without the variant
    finds no weights at all, so it must load with the variant, whatever the dtype."""
    folder = Path(source)
    if not folder.is_dir():
        return False
    weights = [p.name for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    marker = f".{variant}."
    return bool(weights) and all(marker in name for name in weights)


def load_variant(model: ModelConfig, dtype: str) -> str | None:
    """The weight variant to load: the configured one in float16; in float32 (CPU) the full
    weights, unless the source holds only the variant's files: then those, upcast."""
    if not model.variant or model.source == TINY_SOURCE:
        return None
    if dtype == "float16" or only_variant_weights(model.source, model.variant):
        return model.variant
    return None


def model_identity(model: ModelConfig, device: Device) -> ModelIdentity:
    dtype = dtype_name(model, device)
    fingerprint = None
    if model.source == TINY_SOURCE:
        fingerprint = weights_fingerprint(ensure_tiny_model(model.cache_dir))
    return ModelIdentity(
        name=model.name,
        source=model.source,
        revision=model.revision,
        variant=load_variant(model, dtype),
        dtype=dtype,
        fingerprint=fingerprint,
    )


def is_local_path(source: str) -> bool:
    """model.source names a directory, not a hub repo: absolute, ./ ../ ~, Windows
    separators, or more than one '/'. A missing one must say so, not try the hub."""
    return (
        os.path.isabs(source)
        or source.startswith(("./", "../", "~", ".\\", "..\\"))
        or source in (".", "..")
        or "\\" in source
        or not HUB_REPO_ID.fullmatch(source)
    )


def source_problem(model: ModelConfig) -> str | None:
    """'model.source: ...' for a local directory that is not there (checked up front: the
    hub would answer with a confusing 'repo not found' or an offline error)."""
    source = model.source
    if source == TINY_SOURCE or not is_local_path(source):
        return None
    folder = os.path.expanduser(source)
    if os.path.isdir(folder):
        return None
    what = "is a file, not a directory" if os.path.exists(folder) else "no such directory"
    return (
        f"model.source: {what}: {source}"
        + (f" ({os.path.abspath(folder)})" if folder != os.path.abspath(folder) else "")
        + "; point it at a local copy of the weights (a folder with model_index.json) or use a hub repo id"
        " such as stabilityai/stable-video-diffusion-img2vid-xt"
    )


def download_hint(model: ModelConfig) -> str:
    """The command that fetches the weights (huggingface_hub's `hf` CLI; `huggingface-cli`
    is gone from current releases)."""
    revision = f" --revision {model.revision}" if model.revision else ""
    return f"hf download {model.source}{revision}"
