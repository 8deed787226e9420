"""The driver: config + manifest -> plan -> worker -> store.

    start the first worker         (a process that imports torch and loads the model meanwhile)
    validate config and manifest   (bad input stops the run here, the worker with it)
    prepare the run dir            (writable? room left? clean up after a killed run)
    plan                           (this shard's rows; params and keys; split done from to-do)
    execute on 1..N workers        (each loads the pipeline once; no work: the worker is stopped)
      per item: claim -> generate -> write video -> write sidecar -> append results line
                (a failure is recorded and the batch goes on; a full disk stops the run)
    finish                         (dataset metadata, gallery, summary)

SIGINT / SIGTERM / SIGUSR2 stop the run cleanly at any point (stops.py): the summary then
says how many items are done and left.

The steps before the plan are prepare.py's; what is said about the plan, plan_report.py's;
the summary, summary.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from svdbatch.core.config import Config, Engine
from svdbatch.core.gc_pause import paused_gc
from svdbatch.core.outcomes import Outcome
from svdbatch.core.quality import key_part as quality_key_part
from svdbatch.engine import crews, pool, sweep
from svdbatch.engine.crews import Crew
from svdbatch.engine.output_check import OutputCheck, in_background
from svdbatch.engine.plan import Plan, PlannedItem, make_batches, plan_run
from svdbatch.engine.plan_report import log_plan, warn_shadowed
from svdbatch.engine.pool import execute
from svdbatch.engine.prepare import check_run_dir, load_manifest, record_run_facts, worker_spec
from svdbatch.engine.shards import Shard, resolve_shard
from svdbatch.engine.snapshot_keeper import SnapshotKeeper
from svdbatch.engine.spec import WorkerSpec
from svdbatch.engine.stops import Interrupted, StopRequest, stop_on_signals
from svdbatch.engine.summary import RunProgress, RunSummary, settle_interrupted
from svdbatch.inputs.fetch import UrlCache
from svdbatch.inputs.images import ImageCache
from svdbatch.inputs.items import Manifest
from svdbatch.models.identity import default_num_threads, model_identity
from svdbatch.reports import sweep_page
from svdbatch.reports.gallery import GalleryUpdater
from svdbatch.rundir.dataset import write_dataset
from svdbatch.rundir.sidecar_fields import SidecarRow
from svdbatch.rundir.store import WRITE_STOP_HINT, RunStore

if TYPE_CHECKING:
    from svdbatch.engine.ray_engine import RayCluster

log = logging.getLogger(__name__)


def run(cfg: Config) -> RunSummary:
    cluster = None
    if Engine(cfg.run.engine) is Engine.ray:
        from svdbatch.engine.ray_engine import RayCluster  # Ray is optional: imported only when asked for

        cluster = RayCluster(cfg.run)  # joined on first use, after the input is known good
    try:
        return run_on(cfg, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def run_on(cfg: Config, cluster: RayCluster | None = None) -> RunSummary:
    """The run; `cluster` (run.engine=ray) has the actors do the work instead of local
    processes. A signal stops it cleanly at any point (stops.py)."""
    started = time.perf_counter()
    check_run_dir(cfg)
    with stop_on_signals(cfg.run.stop_grace_s) as stop:
        progress = RunProgress()
        try:
            summary = run_stoppable(cfg, stop, progress, cluster)
        except Interrupted:
            summary = progress.summary or RunSummary(run_dir=Path(cfg.run.dir))
        if stop.requested:
            settle_interrupted(summary, stop, progress)
    summary.seconds = time.perf_counter() - started
    return summary


def run_stoppable(cfg: Config, stop: StopRequest, progress: RunProgress, cluster: RayCluster | None = None) -> RunSummary:
    # Absolute for a cluster: actors on other nodes do not share this working directory.
    store = RunStore(Path(cfg.run.dir).absolute() if cluster else Path(cfg.run.dir), cfg.output.format)
    shard = resolve_shard(cfg.run.shard.index, cfg.run.shard.count, in_hydra_sweep())
    image_cache = ImageCache(store.image_cache)  # what earlier runs learnt about unchanged images
    keep_in = store.replaced_dir(time.time()) if cfg.run.keep_replaced else None
    spec = worker_spec(cfg, store, keep_in)
    # A driver without torch (the CLI) starts its first worker now: it imports torch and
    # loads the model on the other core while this one checks the input and plans.
    crew = crews.start_early(spec) if cluster is None and crews.runs_in_processes(spec) else None
    try:
        with paused_gc():  # a million rows: gc_pause.py
            manifest = load_manifest(cfg, shard, image_cache, parse_cache=store.cache)  # the config is checked first
        devices, num_threads = devices_and_threads(cfg, crew, cluster)  # a bad run.devices fails here
        spec = replace(spec, num_threads=num_threads)  # so every worker computes with the same count
        progress.background = in_background(store)
        store.prepare(cfg.run.min_free_mb, buckets=not progress.background)
        summary = progress.summary = RunSummary(run_dir=store.root)
        progress.store = store
        with store.owner():  # `svdbatch status` asks it whether the run is live
            try:
                run_prepared(cfg, manifest, store, shard, devices, spec, summary, stop, progress, image_cache, cluster, crew)
            except OSError as exc:
                # A full, read-only or vanished run dir at any stage the workers do not handle
                # themselves (config, planning, metadata.jsonl, shards, gallery): stop with the
                # summary, like a stop mid-run.
                why = store.write_stop(exc)
                if why is None:
                    raise
                summary.stop_reason = summary.stop_reason or why
                log.error("stopping: %s (finished items are intact; %s)", summary.stop_reason, WRITE_STOP_HINT)
    finally:
        if crew is not None:
            crews.discard_unused(crew)  # bad input, nothing to do, or a stop before any work
    return summary


def devices_and_threads(cfg: Config, crew: Crew | None, cluster: RayCluster | None = None) -> tuple[list[str], int | None]:
    """One device name per worker, and the intra-op thread count all of them compute with:
    as the early crew's first worker resolved them (this process has no torch), else
    resolved here (with Ray, by the cluster)."""
    if crew is not None:
        return crew.resolved()
    devices = [str(d) for d in cluster.devices()] if cluster else pool.resolve_here(cfg.run.devices, cfg.run.workers)
    return devices, cfg.run.num_threads or default_num_threads(devices)


def run_prepared(
    cfg: Config,
    manifest: Manifest,
    store: RunStore,
    shard: Shard,
    devices: list[str],
    spec: WorkerSpec,
    summary: RunSummary,
    stop: StopRequest,
    progress: RunProgress,
    image_cache: ImageCache,
    cluster: RayCluster | None = None,
    crew: Crew | None = None,
) -> None:
    """Plan the rows, commit what needs no model, generate the rest, then write the derived
    outputs: one step per function."""
    record_run_facts(cfg, manifest, store, shard, summary)
    identity = model_identity(cfg.model, devices[0])
    items = manifest.items  # this shard's (load_manifest validated no other)
    # Image URLs are cached per run dir, and refused from their header beyond run.max_image_pixels.
    fetcher = UrlCache(store.downloads, cfg.fetch, max_pixels=cfg.run.max_image_pixels)
    sweep_root = sweep.current_sweep_root()
    if sweep_root is not None:
        warn_shadowed(items, sweep_root)
    reuse = sweep.reuse_index(store.root, sweep_root, cfg.run.reuse_from) if cfg.run.reuse else None
    plan_items = planner(cfg, store, identity.as_dict(), fetcher, image_cache, reuse)
    with paused_gc():
        plan = progress.plan = plan_items(items, limit=cfg.run.limit, check_outputs=not progress.background)
    checks = OutputCheck(store, plan.unchecked, plan.index) if progress.background else None
    plan.unchecked, plan.index = [], None  # the checks hold them until they are done
    image_cache.flush()
    summary.skipped = plan.done_count
    # From here on items may be in flight (reused ones committed, generated ones): a signal asks
    # them to finish instead of raising.
    stop.cooperative = True
    commit_without_model(plan, store, summary)
    log_plan(plan, shard, manifest, spec)

    gallery = GalleryUpdater(store.root, cfg.run.gallery_every_s, cfg.run.gallery_max_items) if cfg.run.gallery else None
    work = partial(run_todo, cfg=cfg, store=store, spec=spec, devices=devices, summary=summary, stop=stop, gallery=gallery)
    # In a sweep, worker processes stay up for the next point (same model: no reload); while
    # outputs are being checked, for the items they may hand back.
    if checks is not None:
        checks.start()  # the first batches are handed out while it works
    keeper = SnapshotKeeper(store).start()
    try:
        work(plan.todo, cluster=cluster, crew=crew, keep=in_hydra_sweep() or checks is not None)
        if checks is not None:
            redo_broken(checks, plan, plan_items, work, summary, stop, cluster, crew)
    finally:
        keeper.stop()
        if checks is not None and not in_hydra_sweep():
            crews.let_go(spec)  # kept for the items the checks might hand back
    if not stop.requested:
        keeper.refresh()  # the next run over this run dir decodes only what comes after
    if stop.requested:
        return  # no time for dataset files and gallery: the next run writes them
    if summary.stop_reason is not None:
        return  # the run dir cannot be written (full, read-only, gone): the next run writes them
    write_derived_outputs(cfg, store, gallery, sweep_root)
    if summary.busy:
        log.warning("%d items are being generated by another process; run again later to pick up any it leaves", summary.busy)


def planner(
    cfg: Config,
    store: RunStore,
    identity: dict[str, Any],
    fetcher: UrlCache,
    image_cache: ImageCache,
    reuse: sweep.ReuseIndex | None,
) -> Callable[..., Plan]:
    """plan_run with this run's settings: the driver plans its rows with it, and again the
    items the output checks hand back."""
    return partial(
        plan_run,
        cond=cfg.conditioning,
        model=cfg.model,
        memory=cfg.memory,
        model_identity=identity,
        store=store,
        fetcher=fetcher,
        max_image_pixels=cfg.run.max_image_pixels,
        output=cfg.output,
        image_cache=image_cache,
        reuse=reuse,
        key_extra=quality_key_part(cfg.quality),
        keep_done=False,  # counted, not kept: memory grows with what is left to do
    )


def commit_without_model(plan: Plan, store: RunStore, summary: RunSummary) -> None:
    """Finished items whose meta_* values changed get the new row; items another run dir
    finished with the same key are linked. Neither loads a model (a sweep point of only
    reused items loads none); a reuse that fails goes back to the to-do list."""
    for entry in plan.meta_changed:  # no model needed: the sidecar gets the new row
        if store.update_row(entry.item.id, str(entry.key), str(entry.output_key), SidecarRow(**entry.item.row_record())):
            summary.meta_updated += 1
            summary.skipped -= 1
    if summary.meta_updated:
        log.info("updated the metadata (meta_* values) of %d finished items; their videos are unchanged", summary.meta_updated)
    for entry, source in plan.reuse:  # before any model loads: a point of only reused items loads none
        if sweep.commit_reused(store, entry, source):
            summary.reused += 1
        else:
            plan.todo.append(entry)
    if plan.reuse:
        log.info(
            "reused %d items finished with the same key elsewhere (%s)",
            summary.reused,
            ", ".join(sorted({str(s.run_dir) for _, s in plan.reuse})[:3]),
        )


def write_derived_outputs(cfg: Config, store: RunStore, gallery: GalleryUpdater | None, sweep_root: Path | None) -> None:
    """metadata.jsonl (+ shards), the gallery and the sweep page: what the run dir holds now."""
    write_dataset(store, cfg.output)
    if gallery:
        gallery.update(raise_disk_full=True)
    if sweep_root is not None and cfg.run.gallery:
        sweep_page.update_sweep_page(sweep_root, cfg.run.gallery_max_items)


def run_todo(
    todo: list[PlannedItem],
    cfg: Config,
    store: RunStore,
    spec: WorkerSpec,
    devices: list[str],
    summary: RunSummary,
    stop: StopRequest,
    gallery: GalleryUpdater | None,
    cluster: RayCluster | None,
    crew: Crew | None,
    keep: bool,
) -> None:
    """Generate the to-do items on the workers, with a progress bar; outcomes into `summary`."""
    if not todo:
        return
    bar = tqdm(total=len(todo), desc=store.root.name, unit="item", disable=not cfg.run.progress, dynamic_ncols=True)

    def on_done(outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            summary.count(outcome)
        bar.update(len(outcomes))
        bar.set_postfix(done=summary.done, failed=summary.failed, refresh=False)
        if gallery and not stop.requested:
            gallery.maybe_update()

    # While the bar is drawn, log lines go through tqdm.write: printed above the bar on
    # their own line, not glued onto it (the bar writes no newline).
    with logging_redirect_tqdm() if cfg.run.progress else nullcontext():
        try:
            execute(make_batches(todo, cfg.run.batch_size), spec, devices, on_done, stop, cluster, keep=keep, crew=crew)
        finally:
            bar.close()


def redo_broken(
    checks: OutputCheck,
    plan: Plan,
    plan_items: Callable[..., Plan],
    work: Callable[..., None],
    summary: RunSummary,
    stop: StopRequest,
    cluster: RayCluster | None,
    crew: Crew | None,
) -> None:
    """Once the background checks are over: plan and run the finished items whose output or
    sidecar turned out missing or cut (they were counted done), as a small run of their own."""
    if stop.requested or summary.stop_reason is not None:
        return  # the next run checks them again
    broken = checks.result()
    if not broken:
        return
    log.warning("%d finished items have a missing or cut video or sidecar; generating them again", len(broken))
    again = plan_items(broken)
    todo = again.todo + [entry for entry, _ in again.reuse]
    plan.done_count -= len(broken) - again.done_count
    summary.skipped -= len(broken) - again.done_count
    plan.todo += todo
    plan.all += again.all
    work(todo, cluster=cluster, crew=crew, keep=in_hydra_sweep())


def in_hydra_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
