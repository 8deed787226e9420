"""Manifest files (CSV or JSONL) or a folder of images -> validated items: read_manifest and
its steps (the reader for the file, the parse cache, this shard's rows, every row checked,
then the images of the valid ones, in bulk).

Everything is checked before any model loads, and every problem is reported at once as
``file:line: field 'x': what is wrong``. File-level problems (unreadable file, unknown
columns, no rows) are always fatal; row-level problems are fatal in strict mode and
otherwise skip just that row (the driver records it in the failure records).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from svdbatch.core.config import ImageCheck, image_check_mode
from svdbatch.core.errors import ManifestError
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS
from svdbatch.inputs.ids import row_id
from svdbatch.inputs.images import ImageCache
from svdbatch.inputs.images import check_images as check_image_files
from svdbatch.inputs.items import Item, Manifest, Problem
from svdbatch.inputs.manifest_formats import IMAGE_SUFFIXES, RowReader, encoding_problem, row_reader
from svdbatch.inputs.parse_cache import file_stamp, load_parse_cache, parse_cache_file, save_parse_cache
from svdbatch.inputs.row_checks import RowChecks, RowValidator, real_root


def read_manifest(
    path: str | os.PathLike,
    *,
    run_seed: int = 0,
    strict: bool = True,
    check_images: bool | str | ImageCheck = True,
    image_root: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    config_params: Mapping[str, Any] | None = None,
    select: Callable[[list[Item]], list[Item]] | None = None,
    image_cache: ImageCache | None = None,
    unique_ids: bool = False,
    shard: tuple[int, int] | None = None,
    parse_cache: Path | None = None,
) -> Manifest:
    """Parse and validate a manifest. Raises ManifestError listing every problem found.

    check_images (run.check_images): full | header | none (True = full, False = none).
    image_root (run.image_root): local images must resolve inside it; None = any path.
    max_image_pixels (run.max_image_pixels): checked from the header unless check_images is none.
    config_params: the config's conditioning values, to check knobs that must agree
    (min <= max guidance) when a row overrides one of them.
    shard: (index, count): only the rows whose id hashes to this shard (shard_of) are
    validated, hashed and kept; the others are read and counted (other_rows). A row whose id
    cannot be told (an unparseable line, no usable id or image) belongs to shard 0. Duplicate
    ids always hash to the same shard, so each shard still finds its own.
    select: the items whose images this process checks (run.limit).
    parse_cache: a folder (the run dir's cache/) where the validated rows are kept, tied to
    the manifest file's path, size and mtime and to these settings: a restart with both
    unchanged reads them back instead of validating every row again (images are still
    checked, through image_cache).
    image_cache: checks already done on unchanged files (the run dir's cache).
    unique_ids: an id derived from the image path (no id column, a folder) that collides with
    an earlier row's is made unique (unique_id) instead of refusing the row: for
    run.emit_manifest, which writes every row out with explicit ids."""
    image_level = image_check_mode(check_images)
    path = Path(path)
    read_rows = row_reader(path)
    checks = RowChecks(run_seed, image_level, real_root(image_root), max_image_pixels, config_params, unique_ids)
    manifest = _cached_or_validated(path, read_rows, checks, shard, parse_cache, strict)
    row_problems = [problem for _, _, problems in manifest.bad_rows for problem in problems]
    row_problems += _check_item_images(manifest, select, image_level, max_image_pixels, image_cache)
    if row_problems and (strict or not manifest.items):
        row_problems.sort(key=lambda p: p.line or 0)
        raise ManifestError(row_problems)
    return manifest


def _cached_or_validated(
    path: Path,
    read_rows: RowReader,
    checks: RowChecks,
    shard: tuple[int, int] | None,
    parse_cache: Path | None,
    strict: bool,
) -> Manifest:
    """The rows from the parse cache while the file and settings are unchanged; else every
    row validated now, and cached unless the manifest is refused."""
    cache_file = None
    if parse_cache is not None and not path.is_dir():
        settings = [
            checks.run_seed, checks.image_level.value, checks.root, checks.max_image_pixels,
            dict(checks.config_params or {}), checks.unique_ids, shard,
        ]  # fmt: skip
        cache_file = parse_cache_file(parse_cache, path, settings)
    stamp = file_stamp(path) if cache_file is not None else None
    manifest = load_parse_cache(cache_file, path, stamp) if cache_file is not None and stamp is not None else None
    if manifest is None:
        manifest = _validate_rows(path, read_rows, checks, shard)
        refused = manifest.bad_rows and (strict or not manifest.items)  # raised by read_manifest: nothing worth keeping
        if cache_file is not None and stamp is not None and not refused and file_stamp(path) == stamp:  # unchanged while read
            save_parse_cache(cache_file, manifest, stamp)
    return manifest


def _validate_rows(path: Path, read_rows: RowReader, checks: RowChecks, shard: tuple[int, int] | None) -> Manifest:
    """Every row (of this shard) checked: valid ones become items, the rest bad_rows. Rows
    are streamed, not held: a 1M-row file never exists as 1M row dicts at once."""
    shown = str(path)
    is_folder = path.is_dir()
    file_problems: list[Problem] = []
    manifest = Manifest(path=path)
    base_dir = str(path.resolve() if is_folder else path.resolve().parent)
    validator = RowValidator(manifest, checks, base_dir)
    read = 0
    try:
        for line, row, problems in read_rows(path, shown, file_problems):
            read += 1
            if shard is not None and not _in_shard(row, shard):
                manifest.other_rows += 1
                continue
            validator.add(line, row, problems)
    except UnicodeDecodeError as exc:
        raise ManifestError([encoding_problem(path, shown, exc)]) from None
    if not read and not file_problems:
        empty = f"folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})" if is_folder else "manifest has no rows"
        file_problems.append(Problem(shown, None, None, empty))
    if file_problems:
        raise ManifestError(file_problems)
    return manifest


def shard_of(item_id: str, count: int) -> int:
    """Shard by a hash of the id, not by row position: an item stays in its shard when rows
    are reordered, inserted or removed, so shards resume cleanly after a manifest edit."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _in_shard(row: Mapping[str, Any], shard: tuple[int, int]) -> bool:
    index, count = shard
    if count == 1:
        return True
    item_id = row_id(row) if row else ""
    return shard_of(item_id, count) == index if item_id else index == 0


def _check_item_images(
    manifest: Manifest,
    select: Callable[[list[Item]], list[Item]] | None,
    level: ImageCheck,
    max_pixels: int | None,
    cache: ImageCache | None,
) -> list[Problem]:
    """Check the local images of the selected valid rows in one go (threads, cache), and move
    the rows whose image fails to bad_rows. Returns their problems."""
    chosen = select(manifest.items) if select else manifest.items
    found = check_image_files((item.image for item in chosen if item.image is not None), level, max_pixels, cache)
    bad = {item.id: item for item in chosen if item.image is not None and found.get(item.image)}
    if not bad:
        return []
    problems = []
    for item in bad.values():
        assert item.image is not None  # bad holds only rows with a local image
        problem = Problem(item.manifest, item.line, "image", f"{found[item.image]} ({item.image_ref})")
        problems.append(problem)
        manifest.bad_rows.append((item.line, item.id, [problem]))
    manifest.items = [item for item in manifest.items if item.id not in bad]
    manifest.bad_rows.sort(key=lambda row: row[0])
    return problems
