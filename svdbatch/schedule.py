"""Plan a run: take this shard's rows, resolve each item's parameters and key, split done
from to-do, and group the rest into batches for the workers.

Pure bookkeeping, no model: it runs before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from .config import ConditioningConfig, ConfigError, MemoryConfig, ModelConfig, ResizeMode
from .fetch import UrlCache
from .images import DEFAULT_MAX_IMAGE_PIXELS, Preprocess, file_sha256
from .manifest import Item
from .params import GenParams, param_defaults
from .store import KeyMaker, RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"run.shard: index must be in [0, count), got index={self.index} count={self.count}")


def shard_from_env(environ: Mapping[str, str], in_hydra_sweep: bool = False) -> Shard:
    """The shard a launcher assigned to this process, if any.

    torchrun and `accelerate launch` set RANK/WORLD_SIZE. A plain Slurm job array sets
    SLURM_ARRAY_TASK_*; under submitit, or in a Hydra multirun, array tasks are sweep points
    rather than shards, so they are not read (shard there with run.shard.index=0,1,...).
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Shard(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
    if "SLURM_ARRAY_TASK_ID" in environ and "SUBMITIT_EXECUTOR" not in environ and not in_hydra_sweep:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        last = int(environ.get("SLURM_ARRAY_TASK_MAX", environ["SLURM_ARRAY_TASK_ID"]))
        count = int(environ.get("SLURM_ARRAY_TASK_COUNT", last - first + 1))
        return Shard(int(environ["SLURM_ARRAY_TASK_ID"]) - first, count)
    return Shard()


def resolve_shard(index: Optional[int], count: Optional[int], in_hydra_sweep: bool = False) -> Shard:
    if index is None and count is None:
        return shard_from_env(os.environ, in_hydra_sweep)
    if index is None or count is None:
        raise ConfigError("run.shard: set both index and count, or neither")
    return Shard(index, count)


def shard_of(item_id: str, count: int) -> int:
    """Shard by a hash of the id, not by row position: an item stays in its shard when rows
    are reordered, inserted or removed, so shards resume cleanly after a manifest edit."""
    digest = hashlib.sha256(item_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(items: list[Item], shard: Shard) -> list[Item]:
    if shard.count == 1:
        return items
    return [item for item in items if shard_of(item.id, shard.count) == shard.index]


@dataclass(frozen=True)
class PlannedItem:
    item: Item
    params: GenParams
    image_sha256: str
    image_bytes: int
    image_mtime_ns: int
    key: Optional[str]  # None when the image could not be fetched
    preprocess: Preprocess
    # The local file to read: the manifest's path, or the downloaded copy of a URL.
    source: Optional[str] = None
    # Why a URL could not be fetched; the worker raises it so it is recorded as this item's failure.
    fetch_error: Optional[str] = None

    def image_record(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "url": self.item.url,
            "sha256": self.image_sha256,
            "bytes": self.image_bytes,
            "mtime_ns": self.image_mtime_ns,
        }


@dataclass
class Plan:
    todo: list[PlannedItem] = field(default_factory=list)
    done: list[PlannedItem] = field(default_factory=list)
    # Not done here, but finished with the same key in another run dir (a sweep's other
    # point, run.reuse_from): linked instead of generated. (entry, sweep.ReuseSource)
    reuse: list[tuple[PlannedItem, Any]] = field(default_factory=list)
    all: list[PlannedItem] = field(default_factory=list)  # manifest order


def plan_run(
    items: list[Item],
    cond: ConditioningConfig,
    model: ModelConfig,
    memory: MemoryConfig,
    model_identity: dict[str, Any],
    store: RunStore,
    limit: Optional[int] = None,
    fetcher: Optional[UrlCache] = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reuse: Any = None,
) -> Plan:
    """Resolve each item's parameters and key, and split done from to-do.

    URL images are downloaded first (in parallel, into the run dir's cache) so their bytes
    can be hashed like local files; an item whose URL fails is planned with fetch_error.
    Hashing every source image on every resume would dominate planning a big run, so a
    finished item's recorded hash is reused while the image's path, size and mtime are
    unchanged (the rule make and rsync use); anything else is hashed afresh.
    `reuse` (sweep.ReuseIndex) finds to-do items another run dir finished with the same key.
    """
    selected = items[:limit] if limit is not None else items
    urls = [item.url for item in selected if item.url]
    if urls and fetcher is None:
        raise ValueError("the manifest has image URLs but no fetcher (download cache) was given")
    fetched = fetcher.fetch_many(urls) if urls else {}
    index = store.finished_index()
    defaults = param_defaults(cond, model, memory)
    run_preprocess = Preprocess.from_config(cond, max_image_pixels)  # a refusal limit: not in the key
    make_key = KeyMaker(model_identity)
    plan = Plan()
    for item in selected:
        params = defaults.resolve(item.overrides)
        preprocess = replace(run_preprocess, resize=ResizeMode(item.resize)) if item.resize else run_preprocess
        url = item.url
        source = fetched[url] if url else item.image
        if isinstance(source, Exception):
            entry = PlannedItem(item, params, "", 0, 0, None, preprocess, fetch_error=str(source))
            plan.todo.append(entry)
            plan.all.append(entry)
            continue
        source = str(source)
        stat = os.stat(source)
        known = index.get(item.id, {})
        if (known.get("image_path"), known.get("image_bytes"), known.get("image_mtime_ns")) == (
            source,
            stat.st_size,
            stat.st_mtime_ns,
        ):
            image_sha256 = known["image_sha256"]
        else:
            image_sha256 = file_sha256(source)
        key = make_key(image_sha256, params, item.seed, preprocess)
        entry = PlannedItem(item, params, image_sha256, stat.st_size, stat.st_mtime_ns, key, preprocess, source)
        if store.is_done(item.id, key, index):
            plan.done.append(entry)
        elif reuse is not None and (source := reuse.lookup(key)) is not None:
            plan.reuse.append((entry, source))
        else:
            plan.todo.append(entry)
        plan.all.append(entry)
    warning = fixed_conditioning_warning(plan.all, model)
    if warning:
        log.warning("%s", warning)
    return plan


def fixed_conditioning_warning(planned: list[PlannedItem], model: ModelConfig) -> Optional[str]:
    """A warning naming the items that vary what the checkpoint was trained with fixed."""
    fixed = dict(model.fixed_conditioning or {})
    if not fixed:
        return None
    off: dict[str, list[str]] = {}
    for entry in planned:
        values = entry.params.as_dict()
        for knob, trained in fixed.items():
            if knob in values and values[knob] != trained:
                off.setdefault(knob, []).append(f"{entry.item.id}={values[knob]:g}")
    if not off:
        return None
    trained_with = ", ".join(f"{knob}={value:g}" for knob, value in fixed.items())
    details = "; ".join(f"{knob}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} ({len(ids)} items)" for knob, ids in off.items())
    return (
        f"model {model.name} was trained with fixed {trained_with} (model card) and was not trained to vary "
        f"them; these items use other values, expect off-distribution motion: {details}"
    )


def shadowed_knobs_warning(items: list[Item], swept: Mapping[str, str]) -> Optional[str]:
    """One warning naming the rows whose own values override a swept conditioning knob
    (`swept`: knob -> the sweep's key for it): at every point they get the same value, so
    the sweep does not vary them (their outputs are reused across points, not redone)."""
    shadowed: dict[str, list[str]] = {}
    for item in items:
        for knob, key in swept.items():
            if knob in item.overrides:
                shadowed.setdefault(key, []).append(item.id)
    if not shadowed:
        return None

    def names(ids: list[str]) -> str:
        return ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")

    return "; ".join(f"{names(ids)}: manifest values override the swept {key}" for key, ids in shadowed.items())


def make_batches(todo: list[PlannedItem], batch_size: int) -> list[list[PlannedItem]]:
    """Group items that can share one pipeline call (equal size, frames, steps and
    micro-conditioning), keeping manifest order within and across groups."""
    if batch_size <= 1:
        return [[entry] for entry in todo]
    open_batches: dict[tuple, list[PlannedItem]] = {}
    batches: list[list[PlannedItem]] = []
    for entry in todo:
        signature = entry.params.batch_signature()
        batch = open_batches.get(signature)
        if batch is None:
            batch = open_batches[signature] = []
            batches.append(batch)
        batch.append(entry)
        if len(batch) == batch_size:
            del open_batches[signature]
    return batches
