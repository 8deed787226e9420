"""The whole-config check at start-up: every value that could only fail later, gathered from
the modules that own each rule, so `svdbatch validate` and a run refuse the same configs
with the same messages (all problems at once, each naming its field), before anything loads.
"""

from __future__ import annotations

from omegaconf import DictConfig

from . import sweep
from .config import ConfigError, check_engine, check_run_and_output, check_schema
from .dataset import check_output_config
from .fetch import check_fetch_config
from .models import compile_problems, source_problem
from .params import check_conditioning, check_model_and_memory
from .plan import shard_problem


def config_problems(cfg: DictConfig) -> list[str]:
    """Every config value that could only fail later, as '<field>: why'."""
    problems = check_conditioning(cfg.conditioning) + check_model_and_memory(cfg.model, cfg.memory)
    problems += check_run_and_output(cfg.run, cfg.output) + check_output_config(cfg.output) + check_fetch_config(cfg.fetch)
    problems += check_engine(cfg.run) + sweep.check_reuse_from(cfg.run.reuse_from)
    # The very call the run makes to pick its shard (environment included).
    shard = shard_problem(cfg.run.shard.index, cfg.run.shard.count, sweep.current_sweep_root() is not None)
    missing = source_problem(cfg.model)
    return problems + [p for p in (shard, missing) if p] + compile_problems(cfg.memory)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError (exit 2) listing every problem of `cfg`, if it has any."""
    check_schema(cfg)  # first, and alone: the checks below read keys a removed section lacks
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
