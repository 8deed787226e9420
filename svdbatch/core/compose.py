"""Composing the config with Hydra: conf/ (config_dir), the schema and resolvers it names
(register_configs: the job dir, the default run name, a sweep point's folder), and which
settings name a sweep point's folder (OUTPUT_SETTINGS)."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from svdbatch.core.config import Config
from svdbatch.core.errors import ConfigError

SCHEMA_NAME = "svdbatch_schema"


def default_run_name(manifest: Any) -> str:
    """run.name when not given: the manifest's stem, or for '.', '..' or a trailing '/' the
    folder's real name (a bare stem would be '' or '..' and put the run dir at outputs/ or
    the working directory)."""
    path = Path(str(manifest))
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.stem or "run"


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


def config_dir() -> str:
    """conf/ of a source checkout (editable install), else the copy packaged in the wheel.
    Whoever composes from it asks here first, so the typed schema its config.yaml names
    (and the resolvers) are registered then: Hydra is imported only by what composes."""
    register_configs()
    source_tree = Path(__file__).resolve().parents[2] / "conf"
    if (source_tree / "config.yaml").is_file():
        return str(source_tree)
    return str(resources.files("svdbatch.conf"))
