"""Structured (typed) configuration, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged into these dataclasses, so a misspelt key or a
value of the wrong type fails at start-up with Hydra's own message instead of being
silently ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, cast

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


SCHEMA_NAME = "svdbatch_schema"
GIF_MAX_LOOP = 65535  # the GIF loop count is a 16-bit field


def schema_problems(cfg: DictConfig) -> list[str]:
    """Keys of a composed config that the typed schema (Config) lacks. Hydra merges
    `+key=value` and `++key=value` into a struct config on purpose (force_add), so a
    misspelt key would be silently ignored (and recorded as if it applied). `~section`
    deletes a whole section (Hydra refuses `~key` inside one). Hydra's own node is not
    part of the schema."""
    container = OmegaConf.to_container(cfg, resolve=False)  # resolving is for later (run.dir needs Hydra)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return _schema_diff(Config, container, "")


def check_schema(cfg: DictConfig) -> None:
    """Raise ConfigError (exit 2) naming every key the schema does not know (`+run.seeed=1`)."""
    problems = schema_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _schema_diff(schema: Any, values: dict, prefix: str) -> list[str]:
    known = {f.name: f for f in fields(schema)}
    problems = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"{name}: unknown key{hint}; svdbatch --help lists every key")
            continue
        nested = known[key].default_factory
        if is_dataclass(nested) and isinstance(value, dict):  # a typed section; a Dict field takes any key
            problems += _schema_diff(nested, value, f"{name}.")
    problems += [f"{prefix}{key}: removed (~{prefix}{key}), but every run needs it" for key in known if key not in values]
    return problems


def range_problem(
    name: str, value: Any, low: float | None = None, high: float | None = None, nullable: bool = False
) -> str | None:
    """'<name>: must be ...' for a numeric setting outside [low, high] (or NaN/inf), else None.
    Typed fields already hold numbers; this is about values that would only fail later."""
    if value is None:
        return None if nullable else f"{name}: must be set"
    bounds = (
        f"in [{low:g}, {high:g}]"
        if low is not None and high is not None
        else f">= {low:g}"
        if low is not None
        else f"<= {high:g}"
    )
    null = " or null" if nullable else ""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}: must be a finite number {bounds}{null}, got {value}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name}: must be {bounds}{null}, got {value}"
    return None


def check_run_and_output(run: Any, output: Any) -> list[str]:
    """Settings that Hydra's typing lets through but that could only fail later (a traceback
    mid-run, every item failing at write time) or silently mean something else. The one
    check of the run and output settings: `validate` and a run both call it."""
    checks = [
        range_problem("run.workers", run.workers, 1),
        range_problem("run.batch_size", run.batch_size, 1),
        range_problem("run.num_threads", run.num_threads, 1, nullable=True),
        range_problem("run.limit", run.limit, 0, nullable=True),
        range_problem("run.max_image_pixels", run.max_image_pixels, 1),
        range_problem("run.min_free_mb", run.min_free_mb, 0),
        range_problem("run.gallery_every_s", run.gallery_every_s, 0),
        range_problem("run.gallery_max_items", run.gallery_max_items, 0),
        range_problem("run.stop_grace_s", run.stop_grace_s, 0),
        range_problem("output.fps", output.fps, 1, 1000, nullable=True),
        range_problem("output.quality", output.quality, 0, 10),
        range_problem("output.loop", output.loop, 0, GIF_MAX_LOOP),
        range_problem("output.shard_size", output.shard_size, 1),
    ]
    return [problem for problem in checks if problem]


def default_run_name(manifest: Any) -> str:
    """run.name when not given: the manifest's stem, or for '.', '..' or a trailing '/' the
    folder's real name (a bare stem would be '' or '..' and put the run dir at outputs/ or
    the working directory)."""
    path = Path(str(manifest))
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.stem or "run"


# Ray refuses a smaller object store.
MIN_OBJECT_STORE_MB = 75


def check_engine(run: Any) -> list[str]:
    """Problems with run.engine / run.ray.* (checked before anything loads)."""
    if Engine(run.engine) is not Engine.ray:
        return []
    import importlib.util

    problems = []
    if importlib.util.find_spec("ray") is None:
        problems.append('run.engine=ray: Ray is not installed; pip install "svdbatch[ray]" (or "ray[default]")')
    ray = run.ray
    if ray.num_cpus is not None and ray.num_cpus < 1:
        problems.append(f"run.ray.num_cpus: must be at least 1 (or null), got {ray.num_cpus}")
    if ray.object_store_mb is not None and ray.object_store_mb < MIN_OBJECT_STORE_MB:
        problems.append(f"run.ray.object_store_mb: Ray needs at least {MIN_OBJECT_STORE_MB}, got {ray.object_store_mb}")
    if not ray.start_timeout_s > 0:
        problems.append(f"run.ray.start_timeout_s: must be positive, got {ray.start_timeout_s}")
    if run.workers < 1:
        problems.append(f"run.workers: must be at least 1, got {run.workers}")
    return problems


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


# Settings that change what an item's output is: its key (model identity, generation
# parameters, preprocessing, seed), its frames (thread count, batching, chunking, compile) or
# the written file (format, fps, quality, loop). Only overrides of these name a sweep point's
# folder, so every other setting (shards, workers, launcher, logging, fetch, limits, ...),
# including any added later, keeps a sweep's points in one run dir. A group name (model,
# memory, conditioning, output) is choosing an option; 'x.*' covers every key under x.
# tests/test_scale_out.py checks that every setting that changes an item's key is here.
OUTPUT_SETTINGS = (
    "model",
    "model.name",
    "model.source",
    "model.revision",
    "model.variant",
    "model.dtype",
    "model.num_frames",
    "conditioning",
    "conditioning.*",
    "memory",
    "memory.forward_chunking",
    "memory.max_decode_chunk_size",
    "memory.compile",
    "memory.compile_mode",
    "memory.compile_fullgraph",
    "memory.compile_backend",
    "output",
    "output.format",
    "output.fps",
    "output.quality",
    "output.loop",
    "run.seed",
    "run.num_threads",
    "run.batch_size",
    # Only while duds are redone (quality.max_attempts > 1) do the rules choose the kept frames.
    "quality",
    "quality.*",
)
MAX_SUBDIR_BYTES = 200  # folder names are limited to 255 bytes


def changes_outputs(key: str) -> bool:
    return key in OUTPUT_SETTINGS or any(name.endswith(".*") and key.startswith(name[:-1]) for name in OUTPUT_SETTINGS)


def override_key(line: str) -> str:
    """'++model.source=x' -> 'model.source', 'model@pkg=svd' -> 'model', '~run.seed' -> 'run.seed'
    (Hydra already parsed these lines; only the key is needed, whatever the value's syntax)."""
    return line.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()


def sweep_subdir(task_overrides: Any) -> str:
    """A sweep point's folder under hydra.sweep.dir: its output-changing overrides
    ('conditioning.fps=6,model=svd_xt'), sorted and made path-safe; '' (the sweep dir
    itself) when there are none, so shards and other settings of one run share a run dir."""
    lines = [str(line) for line in task_overrides or []]
    name = ",".join(sorted(line for line in lines if changes_outputs(override_key(line)))).replace("/", "_")
    if len(name.encode()) > MAX_SUBDIR_BYTES:  # still unique and stable, but short enough to be a file name
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = name.encode()[: MAX_SUBDIR_BYTES - 17].decode(errors="ignore") + "-" + digest
    return name


def hydra_job_dir(_root_: DictConfig) -> str:
    """The folder Hydra runs this job in: `run.dir`'s default (conf/config.yaml).

    Hydra sets hydra.runtime.output_dir only when a job really runs; `--cfg job --resolve`
    and `--info` compose the config without running it, where that key is unset. So the
    folder is derived the way Hydra derives it (hydra.run.dir, or sweep.dir/sweep.subdir in
    a multirun), and made absolute as Hydra does: the printed run.dir is the one a run uses."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        raise ConfigError("run.dir: no Hydra job to take it from; set run.dir=... explicitly")
    hydra_cfg = cast(DictConfig, HydraConfig.get())  # annotated as the HydraConf dataclass, a DictConfig at run time
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    if output_dir:
        return str(output_dir)
    # `--cfg job` has already cut Hydra's node off this config, so its dir settings (which
    # refer to job keys such as run.name) are resolved in a scratch copy holding both.
    scratch = OmegaConf.create(OmegaConf.to_container(_root_, resolve=False))
    scratch.hydra = OmegaConf.to_container(hydra_cfg, resolve=False)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return os.path.abspath(os.path.join(str(scratch.hydra.sweep.dir), str(scratch.hydra.sweep.subdir)))
    return os.path.abspath(str(scratch.hydra.run.dir))


def register_configs() -> None:
    """Register the schema and resolvers before composing (config_dir does; idempotent)."""
    from hydra.core.config_store import ConfigStore  # here: status and gallery never import Hydra

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    OmegaConf.register_new_resolver("svdbatch_job_dir", hydra_job_dir, replace=True)
    OmegaConf.register_new_resolver("svdbatch_stem", default_run_name, replace=True)
    OmegaConf.register_new_resolver("svdbatch_subdir", sweep_subdir, replace=True)


def plain(node: Any) -> Any:
    """A config node (DictConfig or dataclass) as plain JSON-friendly data, enums as strings."""
    if not isinstance(node, DictConfig):
        node = OmegaConf.structured(node)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def config_dir() -> str:
    """conf/ of a source checkout (editable install), else the copy packaged in the wheel.
    Whoever composes from it asks here first, so the typed schema its config.yaml names
    (and the resolvers) are registered then: Hydra is imported only by what composes."""
    register_configs()
    source_tree = Path(__file__).resolve().parents[2] / "conf"
    if (source_tree / "config.yaml").is_file():
        return str(source_tree)
    return str(resources.files("svdbatch.conf"))
