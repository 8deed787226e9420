"""The run dir as a training/analysis dataset.

``metadata.jsonl`` makes the run dir loadable as a Hugging Face dataset as it stands::

    datasets.load_dataset("videofolder", data_dir="outputs/<run>")

one row per finished item: ``file_name`` (the video, relative to the run dir) plus the
item's id, seed, source image and conditioning. It is regenerated at the end of every run
from results.jsonl and the sidecars (every item in the run dir whose video and sidecar are
complete, described by its own sidecar) and replaced atomically, so it never lists a
half-written or failed item, also after a resume or from several processes.

With ``output.webdataset=true`` the items of this run's plan are also packed into WebDataset-style tar
shards (``webdataset/shard-000000.tar``: ``<key>.mp4`` + ``<key>.json`` per sample). Shard n
holds the items at positions [n*size, (n+1)*size) of the manifest and is written once all
of them are done; it is rewritten only when one of its items is redone with a new key, and
removed when it would hold anything that is not done with its current key.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from svdbatch.core.atomic import atomic_path, atomic_write_bytes
from svdbatch.core.config import OutputConfig, OutputFormat
from svdbatch.core.jsonl import to_json
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.store import METADATA_FILE, SHARD_INDEX, SHARDS_DIR, RunStore, output_intact

log = logging.getLogger(__name__)


# Read-only members (properties): engine.plan's PlannedItem is a frozen dataclass.
class _Item(Protocol):
    @property
    def id(self) -> str: ...


class PlannedItem(Protocol):
    """What the exports read of a planned item (engine.plan.PlannedItem): its id and keys."""

    @property
    def item(self) -> _Item: ...
    @property
    def key(self) -> str | None: ...
    @property
    def output_key(self) -> str | None: ...


# Bump when metadata_row changes what it writes: rows cached in the run dir are then rebuilt.
METADATA_ROW_VERSION = 1
# Rows of metadata.jsonl by item, with the results line each was made from (in store.CACHE_DIR).
ROWS_CACHE = "metadata-rows.json"
# The results-line fields that change whenever an item's sidecar does (a new commit).
COMMIT_FIELDS = ("key", "output_key", "output", "output_bytes", "sidecar_bytes", "finished_at")


def metadata_row(sidecar: Sidecar) -> dict[str, Any]:
    """One dataset row from an item's sidecar: the video, what made it, and the row's meta_* data."""
    width, height = sidecar.image.size or (None, None)
    row = {
        "file_name": sidecar.output.path,
        "id": sidecar.id,
        "seed": sidecar.seed,
        "image": sidecar.row.image,
        "image_sha256": sidecar.image.sha256,
        "image_width": width,
        "image_height": height,
        "resize": sidecar.preprocess["resize"],
        **sidecar.params,
        "model": sidecar.model["name"],
        "frames_sha256": sidecar.frames_sha256,
    }
    row.update(sidecar.row.meta)
    return row


def finished_rows(store: RunStore) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(latest results line, metadata row) of every finished item in the run dir, by id in
    order: the line agrees with a done sidecar and a complete video. Not limited to this process's plan,
    so runs that share a run dir (shards, run.limit smoke runs) all see the whole set.

    Every run rewrites metadata.jsonl, and reading 100k sidecars takes this machine 12 s, so
    a row is kept (cache/metadata-rows.json) with the results line it was made from, and the
    sidecar is read again only when the item's latest line is another commit. Call under the
    metadata lock."""
    cache_path = store.cache / ROWS_CACHE
    cached = _read_rows_cache(cache_path)
    rows, kept = {}, {}
    for item_id, record in sorted(store.finished_index().items()):
        if not output_intact(store.root, record):
            continue
        commit = [record.get(name) for name in COMMIT_FIELDS]
        hit = cached.get(item_id)
        if hit is not None and hit[0] == commit:
            row = hit[1]
        else:
            sidecar = store.read_sidecar(item_id)
            if sidecar is None or not sidecar.done_with(record.get("key"), record.get("output_key")):
                continue
            row = metadata_row(sidecar)
        kept[item_id] = [commit, row]
        rows[item_id] = (record, row)
    if kept != cached:
        store.cache.mkdir(exist_ok=True)
        body = {"version": METADATA_ROW_VERSION, "rows": kept}
        atomic_write_bytes(cache_path, to_json(body, default=str, separators=(",", ":")).encode())
    return rows


def _read_rows_cache(path: Path) -> dict[str, list]:
    """{id: [commit fields, row]}; empty if missing, unreadable or of another version."""
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(body, dict) or body.get("version") != METADATA_ROW_VERSION or not isinstance(body.get("rows"), dict):
        return {}
    return {
        item_id: hit
        for item_id, hit in body["rows"].items()
        if isinstance(hit, list) and len(hit) == 2 and isinstance(hit[1], dict)
    }


def write_metadata(store: RunStore) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Regenerate metadata.jsonl from results.jsonl and the sidecars, atomically. The lock
    keeps two processes finishing together from replacing a newer list with an older one.
    Returns what it listed (finished_rows), for the shards."""
    target = store.root / METADATA_FILE
    fd = os.open(store.root / ".metadata.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        finished = finished_rows(store)
        rows = [row for _, row in finished.values()]
        # Every row gets every column (null where a row lacks a meta_* key): one schema per file.
        columns = list(dict.fromkeys(key for row in rows for key in row))
        body = "".join(to_json({key: row.get(key) for key in columns}, default=str) + "\n" for row in rows)
        atomic_write_bytes(target, body.encode(), fault="metadata")
    finally:
        os.close(fd)
    return finished


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata: the same samples give byte-identical shards
    archive.addfile(info, io.BytesIO(data))


def _drop_shard(shards: Path, index: dict[str, list], name: str) -> None:
    """A shard must never hold samples that metadata.jsonl no longer lists."""
    if index.pop(name, None) is not None or (shards / name).exists():
        (shards / name).unlink(missing_ok=True)
        log.info("removed outdated shard %s", name)


def write_shards(
    store: RunStore,
    planned: Sequence[PlannedItem],
    finished: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    shard_size: int,
) -> list[Path]:
    """Write every complete shard whose content is new; returns the shards written now.
    `finished` is what metadata.jsonl lists (write_metadata): a planned item is in a shard
    once it is listed there with its current keys."""
    shards = store.root / SHARDS_DIR
    shards.mkdir(exist_ok=True)
    index_path = shards / SHARD_INDEX
    index: dict[str, list] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    by_position = {}
    for position, entry in enumerate(planned):
        record, row = finished.get(entry.item.id, ({}, {}))
        if entry.key is not None and (record.get("key"), record.get("output_key")) == (entry.key, entry.output_key):
            by_position[position] = (entry, record, row)
    written = []
    current = set()
    for start in range(0, len(planned), shard_size):
        positions = range(start, min(start + shard_size, len(planned)))
        name = f"shard-{start // shard_size:06d}.tar"
        current.add(name)
        if not all(position in by_position for position in positions):
            _drop_shard(shards, index, name)  # not complete (yet, or any more after a redo that failed)
            continue
        # The file's sha256 too: a redo with new output settings (or after `verify --repair`)
        # keeps the key but changes the bytes the shard must hold.
        members = [[by_position[p][0].item.id, by_position[p][0].key, by_position[p][1].get("output_sha256")] for p in positions]
        if index.get(name) == members and (shards / name).is_file():
            continue  # already written with exactly these items
        with atomic_path(shards / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
            for position in positions:
                _, record, row = by_position[position]
                key = f"{position:09d}"  # WebDataset keys must not contain dots; ids may
                video = store.root / record["output"]
                _add_member(archive, f"{key}{video.suffix}", video.read_bytes())
                _add_member(archive, f"{key}.json", to_json(row, sort_keys=True).encode())
        index[name] = members
        written.append(shards / name)
    for name in sorted(set(index) - current):
        _drop_shard(shards, index, name)  # the manifest got shorter
    atomic_write_bytes(index_path, to_json(index, indent=1, sort_keys=True).encode())
    return written


def write_dataset(store: RunStore, planned: Sequence[PlannedItem], output: OutputConfig) -> None:
    """Called once at the end of a run: metadata.jsonl, and WebDataset shards if asked for."""
    finished = write_metadata(store)
    if output.webdataset:
        if OutputFormat(output.format) is OutputFormat.frames:
            log.warning("output.webdataset needs a video file format (mp4, gif, webp), not frames: no shards written")
            return
        written = write_shards(store, planned, finished, output.shard_size)
        if written:
            log.info("wrote %d WebDataset shard(s) into %s", len(written), store.root / SHARDS_DIR)
