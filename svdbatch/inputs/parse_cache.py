"""The parse cache (the run dir's cache/rows-*.json): the validated rows of a manifest, tied to
the file's stamp and the validation settings, so a restart reads them back instead of validating again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.inputs.items import Item, Manifest, Problem

log = logging.getLogger(__name__)

# Bump when what the parse cache holds, or how a row is validated, changes meaning.
PARSE_CACHE_VERSION = 2
PARSE_CACHE_PREFIX = "rows-"  # cache/rows-<digest>.json


def file_stamp(path: Path) -> list[int] | None:
    """What ties cached rows to the file: size, mtime, inode and ctime (an edit, a `touch`,
    a replaced file change one of them)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def parse_cache_file(folder: Path, path: Path, settings: list[Any]) -> Path:
    """rows-<manifest and shard>-<the other settings>.json: shards sharing the run dir keep
    one file each; a save removes the same shard's files of other settings (save_parse_cache)."""
    *checks, shard = settings

    def digest(what: Any) -> str:
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    rows = digest([os.path.realpath(path), str(path), shard])
    return folder / f"{PARSE_CACHE_PREFIX}{rows}-{digest([PARSE_CACHE_VERSION, checks])}.json"


def save_parse_cache(target: Path, manifest: Manifest, stamp: list[int]) -> None:
    """The validated rows as columns (a million small JSON objects would load slowly), with
    the file's stamp from before it was read; a failed write only costs the next run a full
    validation."""
    items = manifest.items
    images: dict[str | None, int] = {}
    refs: dict[str, int] = {}
    body = {
        "version": PARSE_CACHE_VERSION,
        "stamp": stamp,
        "ids": [item.id for item in items],
        "image": [images.setdefault(item.image, len(images)) for item in items],
        "ref": [refs.setdefault(item.image_ref, len(refs)) for item in items],
        "seed": [item.seed for item in items],
        "derived": [item.seed_derived for item in items],
        "line": [item.line for item in items],
        "overrides": {n: item.overrides for n, item in enumerate(items) if item.overrides},
        "meta": {n: item.meta for n, item in enumerate(items) if item.meta},
        "resize": {n: item.resize for n, item in enumerate(items) if item.resize is not None},
        "images": list(images),
        "refs": list(refs),
        "bad_rows": [
            [line, item_id, [[p.file, p.line, p.field, p.message, p.item_id] for p in problems]]
            for line, item_id, problems in manifest.bad_rows
        ],
        "renamed": manifest.renamed,
        "other_rows": manifest.other_rows,
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, json.dumps(body, allow_nan=False, separators=(",", ":")).encode())
        same_rows = target.name.rsplit("-", 1)[0]
        for stale in target.parent.glob(f"{same_rows}-*.json"):  # this manifest and shard, other settings
            if stale != target:
                stale.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        log.debug("%s: not cached (%s)", target, exc)


def load_parse_cache(source: Path, path: Path, stamp: list[int]) -> Manifest | None:
    """The rows validated by an earlier run, if the file and settings are unchanged; else None
    (also for a damaged cache file: the manifest is validated again)."""
    try:
        return _read_parse_cache(source, path, stamp)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def _read_parse_cache(source: Path, path: Path, stamp: list[int]) -> Manifest | None:
    try:
        body = json.loads(source.read_bytes())
    except (OSError, ValueError):
        body = None
    if not isinstance(body, dict) or body.get("version") != PARSE_CACHE_VERSION or body.get("stamp") != stamp:
        return None
    shown = str(path)
    images, refs = body["images"], body["refs"]
    no_values: dict[str, Any] = {}
    manifest = Manifest(path=path, cached=True, other_rows=body["other_rows"])
    columns = (body["ids"], body["image"], body["ref"], body["seed"], body["derived"], body["line"])
    manifest.items = items = [
        Item(item_id, images[image], refs[ref], seed, derived, no_values, no_values, shown, line)
        for item_id, image, ref, seed, derived, line in zip(*columns, strict=True)
    ]
    for n, overrides in body["overrides"].items():  # the few rows with values of their own
        items[int(n)].overrides = overrides
    for n, meta in body["meta"].items():
        items[int(n)].meta = meta
    for n, resize in body["resize"].items():
        items[int(n)].resize = resize
    manifest.bad_rows = [
        (line, item_id, [Problem(*problem) for problem in problems]) for line, item_id, problems in body["bad_rows"]
    ]
    manifest.renamed = [(line, image, new_id) for line, image, new_id in body["renamed"]]
    return manifest
