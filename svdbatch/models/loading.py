"""Pipeline factory: model presets, loading, devices, memory presets and the OOM ladder.

The only module that knows diffusers' loading API. The embedded tiny model's recipe lives
in tiny.py; it is loaded here with the very same ``from_pretrained`` call as real checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdbatch.core.config import DType, MemoryConfig, ModelConfig, Offload, plain
from svdbatch.core.errors import ConfigError, ModelLoadError
from svdbatch.models.quiet import quiet_libraries
from svdbatch.models.tiny import TINY_SOURCE, ensure_tiny_model, weights_fingerprint

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that compute with it: the driver plans with
# this module (identity, dtype, threads) and must start without paying ~1 s for torch.

log = logging.getLogger(__name__)

# A Hugging Face repo id: 'name' or 'owner/name' (letters, digits, '-', '_', '.').
HUB_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")


def parse_device(name: Any) -> torch.device:
    """One entry of run.devices: a GPU index (0), or a device name ("cuda:1", "cpu")."""
    import torch

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
    import torch

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


def default_num_threads(devices: Sequence[torch.device | str]) -> int:
    """Intra-op threads per worker when run.num_threads is null: the usable physical cores
    shared out between the workers (torch's own default takes every core the machine has
    for each worker, ignoring quotas and the other workers). It changes float results, so
    it is resolved once (driver.worker_spec) and recorded in every sidecar."""
    return max(1, usable_cores() // max(1, len(devices)))


def pin_threads(num_threads: int | None) -> None:
    """Set this process's intra-op thread count (None or 0: leave torch's). It changes float
    results, so every worker pins the run's count and reproduce pins the recorded one."""
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)


def device_type(device: torch.device | str) -> str:
    """'cuda' or 'cpu' of a torch.device or a device name ('cuda:1'), without torch."""
    return getattr(device, "type", None) or str(device).split(":")[0]


def dtype_name(model: ModelConfig, device: torch.device | str) -> str:
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


def resolve_dtype(model: ModelConfig, device: torch.device | str) -> torch.dtype:
    import torch

    return getattr(torch, dtype_name(model, device))


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


def model_identity(model: ModelConfig, device: torch.device | str) -> ModelIdentity:
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


def compile_problems(memory: MemoryConfig) -> list[str]:
    """memory.compile_mode / compile_backend as torch knows them, checked before the model
    loads (torch.compile would fail in every worker). Imports torch._dynamo: only when compiling."""
    if not memory.compile:
        return []
    import torch._dynamo
    import torch._inductor

    problems = []
    backends = torch._dynamo.list_backends(exclude_tags=())
    if memory.compile_backend not in backends:
        problems.append(f"memory.compile_backend: must be one of {', '.join(backends)}, got {memory.compile_backend!r}")
    modes = list(torch._inductor.list_mode_options())
    if memory.compile_backend == "inductor" and memory.compile_mode not in modes:
        problems.append(f"memory.compile_mode: must be one of {', '.join(modes)}, got {memory.compile_mode!r}")
    return problems


def _from_pretrained(model: ModelConfig, dtype: torch.dtype) -> Any:  # a diffusers pipeline (see LoadedPipeline.pipe)
    from diffusers import StableVideoDiffusionPipeline

    if model.source == TINY_SOURCE:
        return StableVideoDiffusionPipeline.from_pretrained(ensure_tiny_model(model.cache_dir), torch_dtype=dtype)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if model.revision:
        kwargs["revision"] = model.revision
    variant = load_variant(model, str(dtype).removeprefix("torch."))
    if variant:
        # diffusers upcasts variant (fp16) weights to a float32 torch_dtype as it loads them.
        kwargs["variant"] = variant
    if model.cache_dir:
        kwargs["cache_dir"] = model.cache_dir
    missing = source_problem(model)
    if missing:
        raise ModelLoadError(missing)
    source = os.path.expanduser(model.source) if is_local_path(model.source) else model.source
    try:
        return StableVideoDiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        where = "a local directory" if Path(model.source).exists() else "the Hugging Face hub"
        raise ModelLoadError(
            f"could not load model {model.name!r} from {model.source!r} ({where}"
            + (", HF_HUB_OFFLINE is set" if offline else "")
            + f"): {exc}\nDownload the weights first (`{download_hint(model)}`, see docs/gpu.md) on a machine "
            "with network access, or point model.source at a local copy."
        ) from exc


def apply_memory_preset(pipe: Any, memory: MemoryConfig, device: torch.device) -> tuple[Any, bool]:
    """Place the pipeline per the memory preset; returns (pipe, whether the UNet was compiled)."""
    offload = Offload(memory.offload)
    if offload is not Offload.none and device.type != "cuda":
        warnings.warn(
            f"memory={memory.name}: CPU offload needs a GPU; running everything on {device} instead",
            stacklevel=2,
        )
        offload = Offload.none
    if offload is Offload.model:
        pipe.enable_model_cpu_offload(device=device)
    elif offload is Offload.sequential:
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if memory.forward_chunking:
        pipe.unet.enable_forward_chunking()
    if memory.compile and offload is not Offload.none:
        warnings.warn("memory.compile is ignored with CPU offload", stacklevel=2)
        return pipe, False
    if memory.compile:
        options: dict[str, Any] = {"fullgraph": memory.compile_fullgraph, "backend": memory.compile_backend}
        if memory.compile_backend == "inductor":  # modes are inductor settings
            options["mode"] = memory.compile_mode
        import torch

        pipe.unet = torch.compile(pipe.unet, **options)
    return pipe, bool(memory.compile)


@dataclass
class LoadedPipeline:
    pipe: Any  # StableVideoDiffusionPipeline: its components (pipe.unet, ...) are registered at run time, unseen by mypy
    device: torch.device
    dtype: torch.dtype
    identity: ModelIdentity
    load_seconds: float
    compiled: bool
    # The memory preset in effect: starts as configured, lowered in place after an OOM.
    memory: str = "full"
    offloaded: bool = False
    forward_chunking: bool = False
    # Upper bound on decode_chunk_size set by an OOM fallback (None: as planned).
    decode_cap: int | None = None
    cache_key: str | None = None
    # Seconds the compiled UNet's warm-up took (worker.Worker.warm_up), once per load.
    warmup_s: float | None = None

    def memory_record(self) -> dict[str, Any]:
        return {
            "preset": self.memory,
            "offload": self.offloaded,
            "forward_chunking": self.forward_chunking,
            "decode_cap": self.decode_cap,
        }


def lower_memory(loaded: LoadedPipeline, decode_chunk_size: int) -> str | None:
    """One step down the memory ladder after an out-of-memory error, applied in place:
    full -> balanced (model CPU offload) -> low (+ feed-forward chunking, decode 2 frames
    at a time) -> halve decode_chunk_size down to 1. Returns what changed, or None when
    nothing is left to lower. Offload does not change the maths; feed-forward chunking
    (other matrix shapes) and a smaller decode chunk may change the frames slightly,
    which is why every step is recorded in the sidecar."""
    if loaded.cache_key is not None:
        _loaded.pop(loaded.cache_key, None)  # no longer the configured preset: never reuse it
    if loaded.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    if loaded.memory != "balanced" and not loaded.offloaded and not loaded.forward_chunking:
        if loaded.device.type == "cuda" and not loaded.compiled:
            loaded.pipe.enable_model_cpu_offload(device=loaded.device)
            loaded.offloaded = True
        loaded.memory = "balanced"
        if loaded.offloaded:
            return "memory -> balanced (model CPU offload)"
        why = "the UNet is compiled" if loaded.compiled else "offload needs a GPU"
        return f"memory -> balanced (model CPU offload skipped: {why})"
    if not loaded.forward_chunking:
        loaded.pipe.unet.enable_forward_chunking()
        loaded.forward_chunking = True
        loaded.memory = "low"
        loaded.decode_cap = min(2, decode_chunk_size)
        return f"memory -> low (forward chunking, decode_chunk_size {decode_chunk_size} -> {loaded.decode_cap})"
    if decode_chunk_size > 1:
        loaded.decode_cap = max(1, decode_chunk_size // 2)
        return f"decode_chunk_size {decode_chunk_size} -> {loaded.decode_cap}"
    return None


_loaded: dict[str, LoadedPipeline] = {}


def load_pipeline(model: ModelConfig, memory: MemoryConfig, device: torch.device) -> LoadedPipeline:
    """Load (or reuse) the pipeline for this model + memory preset + device.

    One pipeline is kept per process, so the sweep points of a sequential Hydra multirun
    that share model and memory settings do not reload the weights.
    """
    cache_key = json.dumps([plain(model), plain(memory), str(device)], sort_keys=True, default=str)
    if cache_key in _loaded:
        return _loaded[cache_key]
    _loaded.clear()  # hold one model at a time
    quiet_libraries()
    start = time.perf_counter()
    dtype = resolve_dtype(model, device)
    pipe = _from_pretrained(model, dtype)
    pipe, compiled = apply_memory_preset(pipe, memory, device)
    loaded = LoadedPipeline(
        pipe=pipe,
        device=device,
        dtype=dtype,
        identity=model_identity(model, device),
        load_seconds=time.perf_counter() - start,
        compiled=compiled,
        memory=memory.name,
        offloaded=Offload(memory.offload) is not Offload.none and device.type == "cuda",
        forward_chunking=memory.forward_chunking,
        cache_key=cache_key,
    )
    _loaded[cache_key] = loaded
    log.info("loaded %s (%s, %s) in %.2f s", model.name, loaded.identity.dtype, device, loaded.load_seconds)
    return loaded
