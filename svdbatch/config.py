"""Structured (typed) configuration, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged into these dataclasses, so a misspelt key or a
value of the wrong type fails at start-up with Hydra's own message instead of being
silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that is well-typed but not usable (out of range, inconsistent)."""


class DType(str, Enum):
    auto = "auto"  # float16 on CUDA, float32 on CPU
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Offload(str, Enum):
    none = "none"
    model = "model"  # pipe.enable_model_cpu_offload()
    sequential = "sequential"  # pipe.enable_sequential_cpu_offload(): slowest, least VRAM


class OutputFormat(str, Enum):
    mp4 = "mp4"
    gif = "gif"
    webp = "webp"
    frames = "frames"  # a folder of PNG frames: lossless, for exact comparisons


class ResizeMode(str, Enum):
    crop = "crop"  # scale to cover the target, then centre-crop (keeps aspect, loses edges)
    pad = "pad"  # scale to fit inside, then letterbox with pad_color (keeps everything)
    stretch = "stretch"  # plain resize to the target (distorts other aspect ratios)
    none = "none"  # the image must already have the target size


@dataclass
class ModelConfig:
    name: str = "tiny"
    # "tiny" (the embedded random-weight model), a Hugging Face repo id, or a local directory.
    source: str = "tiny"
    revision: Optional[str] = None
    # Weight variant to load ("fp16" for the Stability checkpoints); only used with float16.
    variant: Optional[str] = None
    dtype: DType = DType.auto
    # The checkpoint's trained frame count, used when conditioning.num_frames is null.
    num_frames: int = 14
    # Micro-conditioning the checkpoint was trained with at one fixed value (model card),
    # e.g. {fps: 6, motion_bucket_id: 127} for svd_xt_1_1: other values are off its training
    # distribution, so the plan warns about every item that uses them.
    fixed_conditioning: Dict[str, float] = field(default_factory=dict)
    # Where downloaded weights (hub) or the built tiny model are cached; null = library default.
    cache_dir: Optional[str] = None


@dataclass
class MemoryConfig:
    name: str = "full"
    offload: Offload = Offload.none
    # unet.enable_forward_chunking(): feed-forward layers run in a loop over frames.
    forward_chunking: bool = False
    # Upper bound applied to every item's decode_chunk_size (low-VRAM preset sets 2).
    max_decode_chunk_size: Optional[int] = None
    # torch.compile the UNet (only meaningful without offload).
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compile_fullgraph: bool = True
    # "inductor" generates kernels; "eager" only traces (a cheap check that the UNet compiles).
    compile_backend: str = "inductor"


@dataclass
class ConditioningConfig:
    """Generation parameters. The pipeline's knobs (width .. decode_chunk_size) can also be
    overridden per manifest row; resize, pad_color and background apply to the whole run."""

    width: int = 1024
    height: int = 576
    # null = the model's trained frame count (model.num_frames).
    num_frames: Optional[int] = None
    num_inference_steps: int = 25
    # diffusers' convention: the pipeline passes fps - 1 to the UNet.
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    # null = decode all frames at once (diffusers' default).
    decode_chunk_size: Optional[int] = None
    # How a source image is fitted to width x height (not a pipeline argument, but part of
    # every item's key): crop | pad | stretch | none.
    resize: ResizeMode = ResizeMode.crop
    # Letterbox colour for resize=pad, and the colour transparent pixels are composited onto
    # (PIL colour syntax: a name, '#rrggbb' or 'rgb(r,g,b)').
    pad_color: str = "black"
    background: str = "white"


@dataclass
class OutputConfig:
    format: OutputFormat = OutputFormat.mp4
    # Frame rate of the written file; null = the item's conditioning fps.
    fps: Optional[int] = None
    # imageio-ffmpeg variable-bitrate quality, 0 (worst) .. 10 (best).
    quality: float = 5.0
    # GIF/WebP loop count (0 = forever).
    loop: int = 0
    # Also pack finished items into WebDataset tar shards (<run dir>/webdataset/), shard_size
    # samples each (the last one may be smaller); a shard is written once all its items are done.
    webdataset: bool = False
    shard_size: int = 1000


@dataclass
class FetchConfig:
    """Downloading manifest images given as http(s) URLs (cached in <run dir>/downloads/)."""

    # Seconds allowed for connecting and for each read; a stalled server fails the attempt.
    timeout_s: float = 20.0
    # Extra attempts after a connection error, a timeout, HTTP 408/429 or 5xx (never on other 4xx).
    retries: int = 2
    # Wait before retry n: backoff_s * 2**(n-1).
    backoff_s: float = 1.0
    # Larger responses are refused (protects the disk from a wrong URL).
    max_bytes: int = 64 * 1024 * 1024
    # Parallel downloads while planning.
    workers: int = 8
    user_agent: str = "svdbatch (+https://github.com/svdbatch)"


@dataclass
class ShardConfig:
    """This process's slice of the manifest. null/null = from the launcher's environment
    (RANK/WORLD_SIZE of torchrun or accelerate, or a plain Slurm job array), else 0 of 1."""

    index: Optional[int] = None
    count: Optional[int] = None


@dataclass
class RunConfig:
    name: str = MISSING
    dir: str = MISSING
    # Base seed for rows without a seed: seed = hash(run.seed, item id).
    seed: int = 0
    # strict: any bad manifest row aborts before the model loads.
    # not strict: bad rows are recorded in failures.jsonl and the rest run.
    strict: bool = True
    # Decode every image during validation (catches truncated files before the model loads).
    check_images: bool = True
    # Worker devices: "auto" (every visible GPU, else CPU), a GPU count, or a list such as
    # [0, 1] or ["cuda:2", "cpu"]. One worker process per device.
    devices: Any = "auto"
    # CPU worker processes when devices resolve to the CPU (same code path as GPUs).
    workers: int = 1
    shard: ShardConfig = field(default_factory=ShardConfig)
    # Rows sharing size, frames, steps and micro-conditioning may share one pipeline call.
    # Off by default: batched frames differ from single calls by ~1e-6 (DESIGN.md §7).
    batch_size: int = 1
    # Intra-op threads for torch (null = torch's default, the same in every worker).
    # Float results depend on it, so it is recorded per item: keep it fixed across runs
    # you want to compare bit for bit.
    num_threads: Optional[int] = None
    # Process at most this many rows (after sharding), handy for a smoke run.
    limit: Optional[int] = None
    progress: bool = True
    step_progress: bool = False
    # Only images under this folder may be used (relative paths that climb out with '..',
    # absolute paths elsewhere and symlinks pointing outside are rejected); null = any path.
    image_root: Optional[str] = None
    # Images with more pixels than this are refused before decoding (decompression bombs).
    max_image_pixels: int = 100_000_000
    # Stop cleanly, before loading the model, when the run dir's file system has less free space.
    min_free_mb: int = 200
    # After a CUDA out-of-memory error, retry the item with the next lower memory preset
    # (full -> balanced -> low, then halving decode_chunk_size); recorded in the sidecar.
    retry_on_oom: bool = False
    # <run dir>/index.html contact sheet, rewritten at most every gallery_every_s seconds
    # while items finish, and once at the end. gallery_max_items: newest first; 0 = all.
    gallery: bool = True
    gallery_every_s: float = 10.0
    gallery_max_items: int = 500
    # An item whose key (image bytes, parameters, seed, model) another point of the same sweep
    # already finished, with the same output settings, is linked from there instead of being
    # generated again (sidecar: reused_from). reuse_from adds earlier run dirs or sweep roots
    # to look in (opt-in: their software versions may differ). reuse=false always generates.
    reuse: bool = True
    reuse_from: List[str] = field(default_factory=list)
    # Write the manifest this run would use (ids, images, seeds: e.g. derived from a folder)
    # to <run.dir>/<run.name>.csv for editing, and stop without generating.
    emit_manifest: bool = False


@dataclass
class Config:
    manifest: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)


SCHEMA_NAME = "svdbatch_schema"


def sweep_subdir(override_dirname: str, job_num: int) -> str:
    """A sweep point's folder: its overrides ('conditioning.fps=6,...'), made path-safe."""
    return override_dirname.replace("/", "_") or str(job_num)


def register_configs() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    OmegaConf.register_new_resolver("svdbatch_stem", lambda path: Path(str(path)).stem, replace=True)
    OmegaConf.register_new_resolver("svdbatch_subdir", sweep_subdir, replace=True)


def plain(node: Any) -> Any:
    """A config node (DictConfig or dataclass) as plain JSON-friendly data, enums as strings."""
    if not isinstance(node, DictConfig):
        node = OmegaConf.structured(node)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
