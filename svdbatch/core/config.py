"""Structured (typed) configuration, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged into these dataclasses, so a misspelt key or a
value of the wrong type fails at start-up with Hydra's own message instead of being
silently ignored. Composing with Hydra is compose.py's; checks beyond the typing are
config_checks.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf

from svdbatch.core.errors import ConfigError
from svdbatch.core.quality import QualityConfig


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


class ImageCheck(str, Enum):
    """How much of each source image is read before the run starts (run.check_images)."""

    full = "full"  # decode every image (parallel threads): catches truncated files up front
    header = "header"  # format, size and pixel limit from the header; a file that fails to decode later fails only its item
    none = "none"  # only that the file exists


class ResizeMode(str, Enum):
    crop = "crop"  # scale to cover the target, then centre-crop (keeps aspect, loses edges)
    pad = "pad"  # scale to fit inside, then letterbox with pad_color (keeps everything)
    stretch = "stretch"  # plain resize to the target (distorts other aspect ratios)
    none = "none"  # the image must already have the target size


class Engine(str, Enum):
    local = "local"  # one spawned process per device of this machine (pool.py)
    ray = "ray"  # one Ray actor per GPU of a Ray cluster (ray_engine.py, docs/ray.md)


@dataclass
class ModelConfig:
    name: str = "tiny"
    # "tiny" (the embedded random-weight model), a Hugging Face repo id, or a local directory.
    source: str = "tiny"
    revision: str | None = None
    # Weight variant to load ("fp16" for the Stability checkpoints): used with float16, and
    # in float32 too when a local source holds only that variant's files (upcast on load).
    variant: str | None = None
    dtype: DType = DType.auto
    # The checkpoint's trained frame count, used when conditioning.num_frames is null.
    num_frames: int = 14
    # Micro-conditioning the checkpoint was trained with at one fixed value (model card),
    # e.g. {fps: 6, motion_bucket_id: 127} for svd_xt_1_1: other values are off its training
    # distribution, so the plan warns about every item that uses them.
    fixed_conditioning: dict[str, float] = field(default_factory=dict)
    # Where downloaded weights (hub) or the built tiny model are cached; null = library default.
    cache_dir: str | None = None


@dataclass
class MemoryConfig:
    name: str = "full"
    offload: Offload = Offload.none
    # unet.enable_forward_chunking(): feed-forward layers run in a loop over frames.
    forward_chunking: bool = False
    # Upper bound applied to every item's decode_chunk_size (low-VRAM preset sets 2).
    max_decode_chunk_size: int | None = None
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
    num_frames: int | None = None
    num_inference_steps: int = 25
    # diffusers' convention: the pipeline passes fps - 1 to the UNet.
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    # null = decode all frames at once (diffusers' default).
    decode_chunk_size: int | None = None
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
    # Frame rate of the written file, 1..1000; null = the item's conditioning fps.
    # fps, quality and loop (where the format uses them) are part of each item's output key:
    # changing them redoes the items, so the files always match the settings (docs/verify.md).
    fps: int | None = None
    # 0 (worst) .. 10 (best): mp4 crf = (1 - quality/10) * 51 as imageio-ffmpeg maps it; WebP quality x10.
    quality: float = 5.0
    # GIF/WebP loop count (0 = forever; GIF stores at most 65535).
    loop: int = 0
    # Also pack finished items into WebDataset tar shards (<run dir>/webdataset/), shard_size
    # samples each (the last one may be smaller); a shard is written once all its items are done.
    webdataset: bool = False
    shard_size: int = 1000
    # metadata.jsonl and the WebDataset shards leave duds out (items that broke a quality
    # rule, docs/quality.md); true lists them too, with their `dud` flag and signals.
    include_duds: bool = False


@dataclass
class FetchConfig:
    """Downloading manifest images given as http(s) URLs (cached in <run dir>/downloads/)."""

    # Seconds allowed for connecting and for each read; a stalled server fails the attempt.
    timeout_s: float = 20.0
    # Seconds one URL may take in all: every attempt, and the waits between them. A server
    # that trickles bytes (never idle for timeout_s) is given up when it runs out.
    deadline_s: float = 120.0
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

    index: int | None = None
    count: int | None = None


@dataclass
class RayConfig:
    """run.engine=ray: where the actors run (docs/ray.md)."""

    # Cluster to join: "host:port" of a head node, "ray://host:10001" (Ray Client), "auto".
    # null = Ray's own default: RAY_ADDRESS (set by `ray job submit`), else a cluster started
    # on this machine with `ray start`, else a new local cluster ("local" always starts one).
    address: str | None = None
    # Only for a local cluster the driver starts itself: CPUs it offers (null = every core)
    # and its object store (null = Ray's default, 30% of RAM; batches are small, so little is needed).
    num_cpus: int | None = None
    object_store_mb: int | None = None
    # ... and whether it runs Ray's dashboard (null = when installed, as `ray start` does).
    include_dashboard: bool | None = None
    # How long to wait for every actor to be placed and pass the shared-storage check (an
    # autoscaling cluster may take minutes to add nodes) before the run is refused.
    start_timeout_s: float = 600.0


@dataclass
class RunConfig:
    name: str = MISSING
    dir: str = MISSING
    # Base seed for rows without a seed: seed = hash(run.seed, item id).
    seed: int = 0
    # strict: any bad manifest row aborts before the model loads.
    # not strict: bad rows are recorded in failures.jsonl and the rest run.
    strict: bool = True
    # full | header | none (ImageCheck); true/false mean full/none (older configs). Any
    # because OmegaConf enums refuse booleans; image_check_mode() validates it up front.
    # Results are cached in the run dir by (path, size, mtime), so a restart reads no image.
    check_images: Any = "header"
    # Worker devices: "auto" (every visible GPU, else CPU), a GPU count, or a list such as
    # [0, 1] or ["cuda:2", "cpu"]. One worker process per device. With run.engine=ray, one
    # actor per entry across the cluster: "auto" = one per GPU of the cluster (else
    # run.workers CPU actors), n = n GPU actors (an autoscaling cluster adds nodes for them).
    devices: Any = "auto"
    # CPU worker processes (or Ray actors) when devices resolve to the CPU (same code path as GPUs).
    workers: int = 1
    # local: worker processes on this machine (run.devices). ray: actors on a Ray cluster,
    # for several machines without Slurm (run.ray.*; pip install "svdbatch[ray]").
    engine: Engine = Engine.local
    ray: RayConfig = field(default_factory=RayConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    # Rows sharing size, frames, steps and micro-conditioning may share one pipeline call.
    # Off by default: diffusers' batched path is not bit-identical to single calls (float
    # differences of ~1e-6, at most one 8-bit level in the written frames).
    batch_size: int = 1
    # Intra-op threads per worker. null = the physical cores this process may use (CPU
    # affinity, cgroup quota) divided by the number of workers, at least 1: torch's own
    # default gives every worker all the machine's cores and oversubscribes shared CPUs.
    # Float results depend on it, so it is recorded per item: set it explicitly to compare
    # runs bit for bit across machines or allocations.
    num_threads: int | None = None
    # Process at most this many rows (after sharding), handy for a smoke run; 0 = none
    # (validate and prepare the run dir only); null = all.
    limit: int | None = None
    progress: bool = True
    step_progress: bool = False
    # Only images under this folder may be used (relative paths that climb out with '..',
    # absolute paths elsewhere and symlinks pointing outside are rejected); null = any path.
    image_root: str | None = None
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
    # A finished item whose settings changed (parameters, preprocessing, seed, image, model)
    # is redone; once its new frames are generated, its old video and sidecar are moved to
    # <run dir>/replaced/<UTC start>/ instead of being overwritten (a failed redo moves
    # nothing). On by default: a generated video costs GPU minutes and a stray override
    # (meant for a new run.name) must not destroy a finished run; the cost is disk space for
    # what was replaced, which the plan reports. false = overwrite in place.
    keep_replaced: bool = True
    # An item whose key (image bytes, parameters, seed, model) another point of the same sweep
    # already finished, with the same output settings, is linked from there instead of being
    # generated again (sidecar: reused_from). reuse_from adds earlier run dirs or sweep roots
    # to look in (opt-in: their software versions may differ). reuse=false always generates.
    reuse: bool = True
    reuse_from: list[str] = field(default_factory=list)
    # Write the manifest this run would use (ids, images, seeds: e.g. derived from a folder)
    # to <run.dir>/<run.name>.csv for editing, and stop without generating.
    emit_manifest: bool = False
    # After SIGINT/SIGTERM/SIGUSR2, seconds the items in flight get to finish and commit
    # before they are abandoned (left for the next run) and the run exits. Keep it below the
    # scheduler's kill delay: Kubernetes' terminationGracePeriodSeconds (30 s by default),
    # Slurm's KillWait (30 s) or submitit's signal_delay_s.
    stop_grace_s: float = 20.0


@dataclass
class Config:
    manifest: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    # Rules on each item's quality signals, and redoes of duds (conf/quality/, docs/quality.md).
    quality: QualityConfig = field(default_factory=QualityConfig)


def image_check_mode(value: Any) -> ImageCheck:
    """run.check_images as an ImageCheck (booleans: the older on/off setting)."""
    if isinstance(value, bool):
        return ImageCheck.full if value else ImageCheck.none
    if isinstance(value, ImageCheck):
        return value
    try:
        return ImageCheck(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(mode.value for mode in ImageCheck)
        raise ConfigError(f"invalid config:\n  run.check_images: must be one of {choices}, got {value!r}") from None


_Section = TypeVar("_Section")


def typed(schema: type[_Section], values: Any) -> _Section:
    """`values` (a DictConfig, a dict from a sidecar or config.yaml, or None) as an instance of
    the dataclass `schema`: checked against its fields and types by OmegaConf (ValidationError
    on a wrong type, ConfigAttributeError on an unknown key), interpolations resolved, enums
    as enums, lists and dicts plain. What the engine, the workers and reproduce read."""
    node = OmegaConf.merge(OmegaConf.structured(schema), values if values is not None else {})
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, schema)
    return obj


def plain(node: Any) -> Any:
    """A config node (DictConfig or dataclass) as plain JSON-friendly data, enums as strings."""
    if not isinstance(node, DictConfig):
        node = OmegaConf.structured(node)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
