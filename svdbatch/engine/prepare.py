"""A run's steps before it plans: check where the run dir is and what the input is (the
config, then the manifest), describe the workers (WorkerSpec), and record the run's facts
in the run dir (its resolved config, the manifest's summary, the invalid rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from svdbatch.core.config import Config, image_check_mode, plain
from svdbatch.core.errors import RunDirError, problems_summary
from svdbatch.core.params import PARAM_NAMES
from svdbatch.engine.checks import check_config
from svdbatch.engine.shards import Shard
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.summary import RunSummary
from svdbatch.inputs.images import ImageCache
from svdbatch.inputs.items import Item, Manifest
from svdbatch.inputs.manifest import read_manifest
from svdbatch.reports.status import save_manifest_summary, summary_path
from svdbatch.rundir.run_dirs import run_dir_problem
from svdbatch.rundir.store import INVALID_ROW, RunStore

log = logging.getLogger(__name__)


def check_run_dir(cfg: Config) -> None:
    """Before anything is written into it: the run dir is a folder of its own, and not the
    folder manifest it reads (its outputs would come back as inputs)."""
    why = run_dir_problem(cfg.run.dir)
    if why is None and Path(cfg.manifest).is_dir() and Path(cfg.manifest).resolve() == Path(cfg.run.dir).resolve():
        why = (
            f"run dir {cfg.run.dir} is the folder manifest itself; "
            "its outputs would be read as inputs next time (set run.name=...)"
        )
    if why:
        raise RunDirError(why)


def load_manifest(
    cfg: Config,
    shard: Shard | None = None,
    image_cache: ImageCache | None = None,
    unique_ids: bool = False,
    parse_cache: Path | None = None,
) -> Manifest:
    """The validated rows of `shard` (the whole file is read; the other shards' rows are only
    counted); their images (up to run.limit) checked as deep as run.check_images says.
    `unique_ids`, `parse_cache` (the run dir's cache/): see read_manifest."""
    check_config(cfg)  # the same check validate runs (checks.py)
    level = image_check_mode(cfg.run.check_images)
    limit = cfg.run.limit

    def select(items: list[Item]) -> list[Item]:
        return items[:limit] if limit is not None else items

    return read_manifest(
        cfg.manifest,
        run_seed=cfg.run.seed,
        strict=cfg.run.strict,
        check_images=level,
        image_root=cfg.run.image_root,
        max_image_pixels=cfg.run.max_image_pixels,
        config_params={name: getattr(cfg.conditioning, name) for name in PARAM_NAMES},
        select=select,
        image_cache=image_cache,
        unique_ids=unique_ids,
        shard=(shard.index, shard.count) if shard is not None and shard.count > 1 else None,
        parse_cache=parse_cache,
    )


def worker_spec(cfg: Config, store: RunStore, keep_in: Path | None = None) -> WorkerSpec:
    """What every worker is built from; num_threads stays as configured (None: the default
    for the devices) until the devices are known."""
    return WorkerSpec(
        model=plain(cfg.model),
        memory=plain(cfg.memory),
        output=plain(cfg.output),
        run_dir=str(store.root),
        num_threads=cfg.run.num_threads,
        step_progress=cfg.run.step_progress,
        context={"config": plain(cfg)},
        retry_on_oom=cfg.run.retry_on_oom,
        keep_replaced_in=str(keep_in) if keep_in else None,
        devices=plain(cfg.run)["devices"],
        workers=cfg.run.workers,
        quality=plain(cfg.quality),
    )


def record_run_facts(cfg: Config, manifest: Manifest, store: RunStore, shard: Shard, summary: RunSummary) -> None:
    """The run's resolved config, the manifest's summary and its invalid rows, in the run dir."""
    store.write_config(OmegaConf.to_yaml(cfg, resolve=True), shard.index, shard.count)
    # Lets `svdbatch status` skip re-reading the manifest; it counts the whole manifest, which
    # a shard did not validate. A parse read back from the cache was summarised by its run.
    if shard.count == 1 and not (manifest.cached and summary_path(store.cache, manifest.path).is_file()):
        save_manifest_summary(store.cache, manifest)
    record_invalid_rows(store, manifest, summary)


def record_invalid_rows(store: RunStore, manifest: Manifest, summary: RunSummary) -> None:
    """Every invalid row (run.strict=false) into the failure records, in one write; the terminal
    gets the first few problems and a count, not a line per row."""
    if not manifest.bad_rows:
        return
    store.record_failures(
        [
            (item_id, None, INVALID_ROW, {"problems": [str(p) for p in problems], "line": line})
            for line, item_id, problems in manifest.bad_rows
        ]
    )
    summary.invalid += len(manifest.bad_rows)
    problems = [problem for _, _, row_problems in manifest.bad_rows for problem in row_problems]
    lines = problems_summary(problems, rest=f"all recorded in {store.relative(store.records)}/*.failures.jsonl")
    log.warning("%s invalid manifest row(s) skipped (run.strict=false):\n%s", f"{len(manifest.bad_rows):,}", "\n".join(lines))
