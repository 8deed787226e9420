"""The driver: config + manifest -> plan -> worker -> store.

    validate manifest and config   (nothing loads until the input is known to be good)
    prepare the run dir            (writable? clean up after a killed run)
    plan                           (this shard's rows; params and keys; split done from to-do)
    execute on 1..N workers        (each loads the pipeline once, only if there is work)
      per item: generate -> write video -> write sidecar -> append results line
                (a failure is recorded and the batch goes on)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .config import ConfigError, plain
from .dataset import check_output_config, write_dataset
from .fetch import UrlCache, check_fetch_config
from .manifest import Manifest, read_manifest
from .models import model_identity, resolve_devices
from .params import check_conditioning
from .runner import Outcome
from .schedule import make_batches, plan_run, resolve_shard, select_shard
from .store import RunStore
from .workers import WorkerSpec, execute

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Path
    done: int = 0
    skipped: int = 0
    failed: int = 0
    invalid: int = 0  # manifest rows rejected by validation (non-strict runs)
    seconds: float = 0.0
    generate_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.invalid == 0

    def line(self) -> str:
        per_item = f"{sum(self.generate_seconds) / len(self.generate_seconds):.2f} s/item" if self.generate_seconds else "-"
        invalid = f", {self.invalid} invalid rows" if self.invalid else ""
        return (
            f"svdbatch: {self.done} done, {self.skipped} skipped, {self.failed} failed{invalid} "
            f"in {self.seconds:.1f} s ({per_item}) -> {self.run_dir}"
        )


def load_manifest(cfg: DictConfig) -> Manifest:
    problems = check_conditioning(cfg.conditioning) + check_fetch_config(cfg.fetch) + check_output_config(cfg.output)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return read_manifest(cfg.manifest, run_seed=cfg.run.seed, strict=cfg.run.strict, check_images=cfg.run.check_images)


def run(cfg: DictConfig) -> RunSummary:
    started = time.perf_counter()
    manifest = load_manifest(cfg)
    store = RunStore(Path(cfg.run.dir), cfg.output.format)
    shard = resolve_shard(cfg.run.shard.index, cfg.run.shard.count, in_hydra_sweep())
    store.prepare()
    store.write_config(OmegaConf.to_yaml(cfg, resolve=True), shard.index, shard.count)
    summary = RunSummary(run_dir=store.root)
    for line, item_id, problems in manifest.bad_rows:
        store.record_failure(item_id, None, "invalid manifest row", {"problems": [str(p) for p in problems], "line": line})
        summary.invalid += 1

    devices = resolve_devices(cfg.run.devices, cfg.run.workers)
    identity = model_identity(cfg.model, devices[0])
    items = select_shard(manifest.items, shard)
    fetcher = UrlCache(store.root / "downloads", cfg.fetch)  # image URLs are cached per run dir
    plan = plan_run(items, cfg.conditioning, cfg.model, cfg.memory, identity.as_dict(), store, cfg.run.limit, fetcher)
    summary.skipped = len(plan.done)
    if shard.count > 1:
        log.info("shard %d of %d: %d of %d items", shard.index, shard.count, len(items), len(manifest.items))
    if plan.done:
        log.info("resuming: %d of %d items already done", len(plan.done), len(plan.done) + len(plan.todo))

    if plan.todo:
        bar = tqdm(total=len(plan.todo), desc=store.root.name, unit="item", disable=not cfg.run.progress, dynamic_ncols=True)

        def on_done(outcomes: list[Outcome]) -> None:
            for outcome in outcomes:
                if outcome.ok:
                    summary.done += 1
                    if outcome.generate_s is not None:
                        summary.generate_seconds.append(outcome.generate_s)
                else:
                    summary.failed += 1
            bar.update(len(outcomes))
            bar.set_postfix(done=summary.done, failed=summary.failed, refresh=False)

        execute(make_batches(plan.todo, cfg.run.batch_size), worker_spec(cfg, store), devices, on_done)
        bar.close()

    write_dataset(store, plan.all, cfg.output)  # metadata.jsonl (+ shards): only what is done now
    summary.seconds = time.perf_counter() - started
    return summary


def worker_spec(cfg: DictConfig, store: RunStore) -> WorkerSpec:
    return WorkerSpec(
        model=plain(cfg.model),
        memory=plain(cfg.memory),
        output=plain(cfg.output),
        run_dir=str(store.root),
        # Resolved here, once, so every worker computes with the same thread count.
        num_threads=cfg.run.num_threads or torch.get_num_threads(),
        step_progress=cfg.run.step_progress,
        context={"config": plain(cfg)},
    )


def in_hydra_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
