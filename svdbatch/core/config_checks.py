"""Checks of a composed config beyond what its typing catches: keys the schema lacks
(`+run.seeed=1`), numbers out of range, run.engine=ray's settings. engine/checks.py runs them
before anything loads."""

from __future__ import annotations

import difflib
import math
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from svdbatch.core.config import Config, Engine, OutputConfig, RunConfig, typed
from svdbatch.core.errors import ConfigError

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


def check_schema(cfg: DictConfig | Config) -> None:
    """Raise ConfigError (exit 2) naming every key the schema does not know (`+run.seeed=1`)."""
    if isinstance(cfg, Config):  # a dataclass instance has exactly the schema's fields
        return
    problems = schema_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def run_config(cfg: DictConfig | Config) -> Config:
    """The composed config as the typed Config dataclass the engine reads, once, at the API's
    door: unknown keys refused (check_schema), interpolations (run.dir) resolved now."""
    if isinstance(cfg, Config):
        return cfg
    check_schema(cfg)
    return typed(Config, cfg)


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


def check_run_and_output(run: RunConfig, output: OutputConfig) -> list[str]:
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


# Ray refuses a smaller object store.
MIN_OBJECT_STORE_MB = 75


def check_engine(run: RunConfig) -> list[str]:
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
