"""The whole-config check at start-up: every value that could only fail later, gathered from
the modules that own each rule, so `svdbatch validate` and a run refuse the same configs
with the same messages (all problems at once, each naming its field), before anything loads.
"""

from __future__ import annotations

from svdbatch.core.config import Config
from svdbatch.core.config_checks import check_engine, check_run_and_output, check_schema
from svdbatch.core.errors import ConfigError
from svdbatch.core.params import check_conditioning, check_model_and_memory
from svdbatch.core.quality import check_quality
from svdbatch.engine import sweep
from svdbatch.engine.shards import shard_problem
from svdbatch.inputs.fetch import check_fetch_config
from svdbatch.models.compile_options import compile_problems
from svdbatch.models.identity import source_problem


def config_problems(cfg: Config) -> list[str]:
    """Every config value that could only fail later, as '<field>: why'."""
    problems = check_conditioning(cfg.conditioning) + check_model_and_memory(cfg.model, cfg.memory)
    problems += check_run_and_output(cfg.run, cfg.output) + check_fetch_config(cfg.fetch)
    problems += check_engine(cfg.run) + sweep.check_reuse_from(cfg.run.reuse_from) + check_quality(cfg.quality)
    # The very call the run makes to pick its shard (environment included).
    shard = shard_problem(cfg.run.shard.index, cfg.run.shard.count, sweep.current_sweep_root() is not None)
    missing = source_problem(cfg.model)
    return problems + [p for p in (shard, missing) if p] + compile_problems(cfg.memory)


def check_config(cfg: Config) -> None:
    """Raise ConfigError (exit 2) listing every problem of `cfg`, if it has any."""
    check_schema(cfg)  # first, and alone: the checks below read keys a removed section lacks
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
