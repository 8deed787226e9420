"""Plan a run: resolve each item's parameters and key, split done from to-do (and what a
to-do item replaces), and group the rest into batches for the workers. Which rows are this
shard's: shards.py; what is said about the plan: plan_report.py.

Pure bookkeeping, no model: it runs before anything heavy loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

from svdbatch.core.config import ConditioningConfig, MemoryConfig, ModelConfig, OutputConfig, ResizeMode
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS, GenParams, Preprocess, param_defaults
from svdbatch.inputs.fetch import UrlCache
from svdbatch.inputs.images import ImageCache, file_sha256, parallel_map
from svdbatch.inputs.items import Item
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.keys import KeyMaker
from svdbatch.rundir.outputs import output_key, output_settings, written_fps
from svdbatch.rundir.resume_index import ResumeRecord
from svdbatch.rundir.sidecar import EMPTY_META_SHA256, Sidecar, meta_digest
from svdbatch.rundir.store import RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # slots: a first run of 1M rows plans a million
class PlannedItem:
    item: Item
    params: GenParams
    image_sha256: str
    image_bytes: int
    image_mtime_ns: int
    key: str | None  # None when the image could not be fetched
    preprocess: Preprocess
    # The local file to read: the manifest's path, or the downloaded copy of a URL.
    source: str | None = None
    # Why a URL could not be fetched (or a local file vanished after validation); the worker
    # raises it so it is recorded as this item's failure.
    fetch_error: str | None = None
    # Hash of the output settings the file is written with (outputs.output_settings): with
    # `key`, what must match for the item to count as done.
    output_key: str | None = None

    def image_record(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "url": self.item.url,
            "sha256": self.image_sha256,
            "bytes": self.image_bytes,
            "mtime_ns": self.image_mtime_ns,
        }


@dataclass(frozen=True)
class Replacement:
    """A to-do item whose finished output (of an older key) is still in the run dir: running
    overwrites it. `changes` names what differs from its sidecar: (field, recorded, new)."""

    entry: PlannedItem
    old_key: str
    changes: tuple[tuple[str, Any, Any], ...]


@dataclass
class Plan:
    todo: list[PlannedItem] = field(default_factory=list)
    done: list[PlannedItem] = field(default_factory=list)  # empty unless plan_run(keep_done=True)
    done_count: int = 0  # done items, kept in `done` or not
    total: int = 0  # items planned (done, to do, reused)
    # Not done here, but finished with the same key in another run dir (a sweep's other
    # point, run.reuse_from): linked instead of generated. (entry, sweep.ReuseSource)
    reuse: list[tuple[PlannedItem, Any]] = field(default_factory=list)
    all: list[PlannedItem] = field(default_factory=list)  # manifest order (done ones only with keep_done)
    replaced: list[Replacement] = field(default_factory=list)  # to-do items that overwrite a finished output
    # Done items whose row's meta_* values changed since: their sidecar is updated, not regenerated.
    meta_changed: list[PlannedItem] = field(default_factory=list)
    # plan_run(check_outputs=False): items counted done by their keys alone, whose output and
    # sidecar are still to be checked (output_check.py), and the index that says their sizes.
    unchecked: list[Item] = field(default_factory=list)
    index: Mapping[str, Any] | None = None


def source_hashes(
    items: list[Item], source_of: Callable[[Item], str | Exception], cache: ImageCache, index: Mapping[str, Any]
) -> dict[str, Any]:
    """Each distinct source's sha256, or why it cannot be read. A hash is reused while the
    image's path, size and mtime are unchanged: from the image cache, else from the item's
    finished record; the rest are hashed on a few threads, and learnt by the cache."""
    hashes: dict[str, Any] = {}  # source -> sha256, None (to hash) or why it cannot be read
    for item in items:
        source = source_of(item)
        if isinstance(source, Exception) or source in hashes:
            continue
        try:
            info = cache.stat(source)
        except OSError as exc:  # gone since validation (or never checked, past run.limit): this item fails, not the run
            hashes[source] = OSError(f"image file not readable: {exc.strerror} ({source})")
            continue
        known = cache.facts(source, info).get("sha256")
        if known is None:
            record: Mapping[str, Any] | ResumeRecord = index.get(item.id) or {}
            if (record.get("image_path"), record.get("image_bytes"), record.get("image_mtime_ns")) == (
                source,
                info.st_size,
                info.st_mtime_ns,
            ):
                known = record.get("image_sha256")
                cache.learn(source, info, sha256=known)
        hashes[source] = known
    unknown = [source for source, known in hashes.items() if known is None]
    for source, digest in zip(unknown, parallel_map(hash_or_error, unknown), strict=False):
        hashes[source] = digest
        if isinstance(digest, str):
            cache.learn(source, cache.stat(source), sha256=digest)
    return hashes


def plan_run(
    items: list[Item],
    cond: ConditioningConfig,
    model: ModelConfig,
    memory: MemoryConfig,
    model_identity: dict[str, Any],
    store: RunStore,
    limit: int | None = None,
    fetcher: UrlCache | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    output: OutputConfig | None = None,
    image_cache: ImageCache | None = None,
    reuse: Any = None,
    key_extra: dict[str, Any] | None = None,
    keep_done: bool = True,
    check_outputs: bool = True,
) -> Plan:
    """Resolve each item's parameters and key, and split done from to-do.

    URL images are downloaded first (in parallel, into the run dir's cache) so their bytes
    can be hashed like local files; an item whose URL fails is planned with fetch_error.
    Hashing every source image on every resume would dominate planning a big run, so a
    hash is reused while the image's path, size and mtime are unchanged (the rule make and
    rsync use): from the image cache, else from the item's finished record; the rest are
    hashed on a few threads, and learnt by the cache.
    `output` (default: the run dir's format with default settings) gives the output keys.
    `reuse` (sweep.ReuseIndex) finds to-do items another run dir finished with the same key.
    `key_extra` is hashed into every key besides the model (quality.key_part: the rules, while
    duds are redone).
    `keep_done=False` (a run): done items are counted, not kept (except those whose meta_*
    values changed), so a restart of 1M rows with 99% done holds the 1% it has to do.
    `check_outputs=False`: a done item's output and sidecar sizes are not checked here (two
    stats each, a quarter of a big restart's planning) but listed in `plan.unchecked`, for
    the caller to check once its first items run (output_check.py).

    Long on purpose: the loop over the rows runs a million times on a big restart, so each
    row's steps (parameters, output key, item key, done or to do) stay inline, without a
    call and its argument passing per row; the steps before it are functions of their own.
    """
    output = output if output is not None else OutputConfig(format=store.format)
    out_keys: dict[int, str] = {}  # per item fps: a run has few
    selected = items[:limit] if limit is not None else items
    urls = [item.url for item in selected if item.image is None and item.url]  # image is None only for a URL
    if urls and fetcher is None:
        raise ValueError("the manifest has image URLs but no fetcher (download cache) was given")
    fetched = fetcher.fetch_many(urls) if urls and fetcher is not None else {}
    cache = image_cache or ImageCache(None)
    index = store.finished_index(compact=True)
    defaults = param_defaults(cond, model, memory)
    run_preprocess = Preprocess.from_config(cond, max_image_pixels)  # a refusal limit: not in the key
    make_key = KeyMaker({**model_identity, **(key_extra or {})})

    def source_of(item: Item) -> str | Exception:
        """The local file to read, or why a URL could not be fetched."""
        if item.image is not None:
            return item.image
        fetched_file = fetched[cast(str, item.url)]  # no local image: a URL
        return fetched_file if isinstance(fetched_file, Exception) else str(fetched_file)

    hashes = source_hashes(selected, source_of, cache, index)

    plan = Plan(total=len(selected))
    base_params = defaults.resolve({})  # most rows override nothing: resolved and serialised once
    base_tail = make_key.tail(base_params, run_preprocess)
    for item in selected:
        source = item.image if item.image is not None else source_of(item)
        params = defaults.resolve(item.overrides) if item.overrides else base_params
        out_key = out_keys.get(params.fps)
        if out_key is None:  # once per distinct fps: computing an output key per row would dominate a 1M-row plan
            out_key = out_keys[params.fps] = output_key(output_settings(output, written_fps(output, params.fps)))
        preprocess = replace(run_preprocess, resize=ResizeMode(item.resize)) if item.resize else run_preprocess
        problem = source if isinstance(source, Exception) else hashes[source]
        if isinstance(problem, Exception) or isinstance(source, Exception):
            entry = PlannedItem(item, params, "", 0, 0, None, preprocess, fetch_error=str(problem), output_key=out_key)
            plan.todo.append(entry)
            plan.all.append(entry)
            continue
        tail = base_tail if params is base_params and preprocess is run_preprocess else make_key.tail(params, preprocess)
        image_sha256: str = problem  # no problem: the hash
        key = make_key.key_with(image_sha256, item.seed, tail)
        if check_outputs:
            done = store.is_done(item.id, key, out_key, index)
        else:
            trusted = done_by_keys(index.get(item.id), key, out_key)
            done = trusted or store.is_done(item.id, key, out_key, index)
            if trusted:
                plan.unchecked.append(item)
        edited = done and meta_edited(item, index.get(item.id), store)
        if done and not (keep_done or edited):
            plan.done_count += 1
            continue  # no entry: a million done rows cost no objects
        info = cache.stat(source)
        entry = PlannedItem(
            item, params, image_sha256, info.st_size, info.st_mtime_ns, key, preprocess, source, output_key=out_key
        )
        if done:
            plan.done_count += 1
            if keep_done:
                plan.done.append(entry)
            if edited:
                plan.meta_changed.append(entry)
            if not keep_done:
                continue
        else:
            reused = reuse.lookup(key, out_key) if reuse is not None else None
            if reused is not None:
                plan.reuse.append((entry, reused))
            else:
                plan.todo.append(entry)
                replacement = find_replacement(entry, index.get(item.id), store, model_identity, key_extra)
                if replacement is not None:
                    plan.replaced.append(replacement)
        plan.all.append(entry)
    plan.index = index if plan.unchecked else None
    warning = fixed_conditioning_warning(plan.all, model)
    if warning:
        log.warning("%s", warning)
    return plan


def done_by_keys(record: ResumeRecord | None, key: str, out_key: str) -> bool:
    """An item the index says is done with these keys, its output not looked at yet."""
    return record is not None and record.key == key and record.output_key == out_key and record.output is not None


def meta_edited(item: Item, record: Mapping[str, Any] | ResumeRecord | None, store: RunStore) -> bool:
    """Whether a done item's meta_* values differ from what its sidecar records: from the
    results line's digest, or (a line from before it was recorded, or recovered from the
    sidecar) from the sidecar itself."""
    recorded = record.get("meta_sha256") if record is not None else None
    if recorded is not None:
        return recorded != (meta_digest(item.meta) if item.meta else EMPTY_META_SHA256)
    sidecar = store.read_sidecar(item.id)
    return sidecar is not None and sidecar.row.meta != item.meta


def hash_or_error(path: str) -> str | OSError:
    try:
        return file_sha256(path)
    except OSError as exc:
        return OSError(f"image file not readable: {exc.strerror} ({path})")


def find_replacement(
    entry: PlannedItem,
    record: Mapping[str, Any] | ResumeRecord | None,
    store: RunStore,
    model_identity: dict[str, Any],
    key_extra: dict[str, Any] | None = None,
) -> Replacement | None:
    """Whether running this to-do item overwrites a finished output of another key, and
    what changed. Reads the item's sidecar only then, so an unchanged resume reads none."""
    if record is None or entry.key is None or not output_intact(store.root, record):
        return None
    if record.get("key") == entry.key and record.get("output_key") == entry.output_key:
        return None
    sidecar = store.read_sidecar(entry.item.id)
    if sidecar is None or sidecar.key != record.get("key"):
        changes: tuple = (("sidecar", "missing or from another run", "-"),)
    else:
        changes = changed_fields(sidecar, entry, model_identity, key_extra) or (("key", "older key format", "current"),)
    return Replacement(entry, str(record.get("key")), changes)


def changed_fields(
    sidecar: Sidecar, entry: PlannedItem, model_identity: dict[str, Any], key_extra: dict[str, Any] | None = None
) -> tuple[tuple[str, Any, Any], ...]:
    """What differs between a finished item's sidecar and its new plan: the inputs of its key
    (generation parameters, preprocessing, seed, image bytes, model, quality redoes), by name."""
    recorded: dict[str, Any] = {**sidecar.params, **_without_version(sidecar.preprocess)}
    new: dict[str, Any] = {**entry.params.as_dict(), **_without_version(entry.preprocess.as_dict())}
    recorded["seed"], new["seed"] = sidecar.seed, entry.item.seed
    recorded["image"] = sidecar.image.sha256[:12]
    new["image"] = entry.image_sha256[:12]
    for name, value in model_identity.items():
        recorded[f"model.{name}"], new[f"model.{name}"] = sidecar.model.get(name), value
    recorded["quality"], new["quality"] = _recorded_redoes(sidecar), _redoes_text((key_extra or {}).get("quality"))
    if sidecar.output_key != entry.output_key:  # same frames, written with other output settings
        settings = sidecar.output.settings
        recorded["output"] = " ".join(f"{k}={v}" for k, v in sorted(settings.items()) if k != "version") or "older format"
        new["output"] = "the config's output settings"
    return tuple((name, recorded.get(name), new.get(name)) for name in new if recorded.get(name) != new.get(name))


def _redoes_text(part: dict[str, Any] | None) -> str:
    """quality.key_part's part of a key as text: the rules and attempts while duds are redone."""
    if not part:
        return "no redoes"
    return " ".join(f"{k}={v}" for k, v in sorted(part["rules"].items())) + f" max_attempts={part['max_attempts']}"


def _recorded_redoes(sidecar: Sidecar) -> str:
    """_redoes_text of what a finished item was made with (its sidecar's quality rules)."""
    if sidecar.quality is None:
        return "no redoes"
    rules = {k: v for k, v in sidecar.quality.rules.items() if k != "max_attempts"}
    attempts = sidecar.quality.rules.get("max_attempts", 1)
    return _redoes_text({"rules": rules, "max_attempts": attempts} if rules and attempts > 1 else None)


def _without_version(preprocess: dict[str, Any] | None) -> dict[str, Any]:
    return {name: value for name, value in (preprocess or {}).items() if name != "version"}


def fixed_conditioning_warning(planned: list[PlannedItem], model: ModelConfig) -> str | None:
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
    details = "; ".join(
        f"{knob}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} ({len(ids)} items)" for knob, ids in off.items()
    )
    return (
        f"model {model.name} was trained with fixed {trained_with} (model card) and was not trained to vary "
        f"them; these items use other values, expect off-distribution motion: {details}"
    )


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
