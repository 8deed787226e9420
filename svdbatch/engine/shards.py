"""Which shard of the manifest this process runs: from run.shard or a launcher's
environment (torchrun, Slurm job arrays), checked like the config, and its rows.

A shard takes rows by hash of the id (inputs.manifest.shard_of), so shards survive edits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from svdbatch.core.errors import ConfigError
from svdbatch.inputs.items import Item
from svdbatch.inputs.manifest import shard_of


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"run.shard: index must be in [0, count), got index={self.index} count={self.count}")


def shard_from_env(environ: Mapping[str, str], in_hydra_sweep: bool = False) -> Shard:
    """The shard a launcher assigned to this process, if any.

    torchrun and `accelerate launch` set RANK/WORLD_SIZE. A plain Slurm job array sets
    SLURM_ARRAY_TASK_*; under submitit, or in a Hydra multirun, array tasks are sweep points
    rather than shards, so they are not read (shard there with run.shard.index=0,1,...).
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Shard(env_int(environ, "RANK"), env_int(environ, "WORLD_SIZE"))
    if "SLURM_ARRAY_TASK_ID" in environ and "SUBMITIT_EXECUTOR" not in environ and not in_hydra_sweep:
        task = env_int(environ, "SLURM_ARRAY_TASK_ID")
        first = env_int(environ, "SLURM_ARRAY_TASK_MIN", 0)
        last = env_int(environ, "SLURM_ARRAY_TASK_MAX", task)
        return Shard(task - first, env_int(environ, "SLURM_ARRAY_TASK_COUNT", last - first + 1))
    return Shard()


def env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """An integer a launcher set; a bad value is the input's fault (exit 2), not a traceback."""
    if name not in environ and default is not None:
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"run.shard: from the environment, {name}={environ[name]!r} is not an integer") from None


def resolve_shard(index: int | None, count: int | None, in_hydra_sweep: bool = False) -> Shard:
    if index is None and count is None:
        return shard_from_env(os.environ, in_hydra_sweep)
    if index is None or count is None:
        raise ConfigError("run.shard: set both index and count, or neither")
    return Shard(index, count)


def shard_problem(index: int | None, count: int | None, in_hydra_sweep: bool = False) -> str | None:
    """What resolve_shard would refuse, as '<field>: why' (the config check asks this, so
    `validate` refuses exactly the shard settings a run refuses)."""
    try:
        resolve_shard(index, count, in_hydra_sweep)
    except ConfigError as exc:
        return str(exc)
    return None


def select_shard(items: list[Item], shard: Shard) -> list[Item]:
    if shard.count == 1:
        return items
    return [item for item in items if shard_of(item.id, shard.count) == shard.index]
