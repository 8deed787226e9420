"""Pipeline factory: loading, memory presets and the OOM ladder.

The only module that knows diffusers' loading API. The embedded tiny model's recipe lives
in tiny.py; it is loaded here with the very same ``from_pretrained`` call as real checkpoints.
What identifies the weights (and the other torch-free facts the driver plans with) is in
identity.py; devices and thread counts in devices.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from svdbatch.core.config import MemoryConfig, ModelConfig, Offload, plain
from svdbatch.core.errors import ModelLoadError
from svdbatch.models.devices import resolve_dtype
from svdbatch.models.identity import ModelIdentity, download_hint, is_local_path, load_variant, model_identity, source_problem
from svdbatch.models.quiet import quiet_libraries
from svdbatch.models.tiny import TINY_SOURCE, ensure_tiny_model

log = logging.getLogger(__name__)


def _from_pretrained(model: ModelConfig, dtype: torch.dtype) -> Any:  # a diffusers pipeline (see LoadedPipeline.pipe)
    # diffusers after quiet_libraries() (load_pipeline): importing it prints transformers' notices.
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
