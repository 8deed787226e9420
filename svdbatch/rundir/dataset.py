"""The run dir as a training/analysis dataset.

``metadata.jsonl`` makes the run dir loadable as a Hugging Face dataset as it stands::

    datasets.load_dataset("videofolder", data_dir="outputs/<run>")

one row per finished item: ``file_name`` (the video, relative to the run dir) plus the
item's id, seed, source image and conditioning. It is regenerated at the end of every run
from the results records (records.py) and the sidecars (every item in the run dir whose video and sidecar are
complete, described by its own sidecar) and replaced atomically, so it never lists a
half-written or failed item, also after a resume or from several processes.

With ``output.webdataset=true`` the same items are also packed into WebDataset-style tar
shards (``webdataset/shard-000000.tar``: ``<key>.mp4`` + ``<key>.json`` per sample, the key
made from the item's id, sample_key). Like metadata.jsonl they are built from the run dir's
records, never from one process's plan: a shard process or a ``run.limit`` smoke run leaves
every finished item in them. An item keeps its shard once packed (webdataset/index.json), new
items fill the last shard up to ``output.shard_size`` and then open new ones, and a shard is
rewritten only when what it must hold changed (an item redone, its metadata edited, or no
longer finished), so a resume rewrites the shards it touched, not all of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from svdbatch.core.atomic import atomic_path, atomic_write_bytes
from svdbatch.core.config import OutputConfig, OutputFormat
from svdbatch.core.jsonl import to_json
from svdbatch.core.locks import lock_or_go_on
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.store import METADATA_FILE, SHARD_INDEX, SHARDS_DIR, RunStore

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
# 2: the quality signals, `dud` and `attempts` (docs/quality.md).
METADATA_ROW_VERSION = 2
# Rows of metadata.jsonl by item, with the results line each was made from (in store.CACHE_DIR).
ROWS_CACHE = "metadata-rows.json"
# The results-line fields that change whenever an item's sidecar does (a new commit).
COMMIT_FIELDS = ("key", "output_key", "output", "output_bytes", "sidecar_bytes", "finished_at", "meta_sha256")


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
    quality = sidecar.quality
    if quality is not None:  # older records have none: no columns (null in a mixed file)
        kept = quality.kept_attempt
        row.update({"dud": quality.dud, "attempts": len(quality.attempts), "generation_seed": kept.seed})
        row.update({"quality_verdict": kept.verdict, "precision": kept.precision})
        row.update(kept.signals)
    row.update(sidecar.row.meta)
    return row


def without_duds(finished: Finished, include_duds: bool) -> Finished:
    """What the dataset files list: every finished item, less the duds unless asked for
    (output.include_duds). A dud stays done in the run dir: only the exports leave it out."""
    if include_duds:
        return finished
    return {item_id: pair for item_id, pair in finished.items() if not pair[1].get("dud")}


def finished_rows(store: RunStore) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(latest results line, metadata row) of every finished item in the run dir, by id in
    order: the line agrees with a done sidecar and a complete video. Not limited to this process's plan,
    so runs that share a run dir (shards, run.limit smoke runs) all see the whole set.

    Every run rewrites metadata.jsonl, and reading 100k sidecars takes this machine 12 s, so
    a row is kept (cache/metadata-rows.json) with the results line it was made from, and the
    sidecar is read again only when the item's latest line is another commit. Call under the
    export lock (export_lock)."""
    cache_path = store.cache / ROWS_CACHE
    cached = _read_rows_cache(cache_path)
    rows, kept = {}, {}
    for item_id, record in sorted(store.finished_index().items()):
        if not output_intact(store.root, record, store.layout):
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


Finished = dict[str, tuple[dict[str, Any], dict[str, Any]]]  # id -> (results line, metadata row)
EXPORT_LOCK = ".metadata.lock"  # one builder of the dataset files at a time, per run dir


@contextmanager
def export_lock(store: RunStore) -> Iterator[None]:
    """Held while the dataset files are rebuilt: two processes finishing together (shards)
    take turns, so the later one builds on the earlier one's files, never half of them."""
    fd = os.open(store.root / EXPORT_LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        lock_or_go_on(fd, str(store.root / EXPORT_LOCK))  # without it two finishers may both rebuild: same result
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_metadata_rows(store: RunStore, finished: Finished) -> None:
    """metadata.jsonl from finished_rows, replaced atomically. Call under export_lock."""
    rows = [row for _, row in finished.values()]
    # Every row gets every column (null where a row lacks a meta_* key): one schema per file.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    body = "".join(to_json({key: row.get(key) for key in columns}, default=str) + "\n" for row in rows)
    atomic_write_bytes(store.root / METADATA_FILE, body.encode(), fault="metadata")


def write_metadata(store: RunStore) -> Finished:
    """Regenerate metadata.jsonl from the results records (records.py) and the sidecars, atomically; returns
    what it listed (finished_rows)."""
    with export_lock(store):
        finished = without_duds(finished_rows(store), False)
        write_metadata_rows(store, finished)
    return finished


def sample_key(item_id: str) -> str:
    """The WebDataset key of an item: its id with '%' and '.' percent-escaped (WebDataset
    splits a member name at its first dot; ids may hold dots). The same for every process
    that builds the shards, and unique because ids are."""
    return item_id.replace("%", "%25").replace(".", "%2E")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata: the same samples give byte-identical shards
    archive.addfile(info, io.BytesIO(data))


# Bump when the index's form or the shards' member names change: shards are then rebuilt.
SHARD_INDEX_VERSION = 2
SHARD_NAME = "shard-{:06d}.tar"


def _read_shard_index(path: Path) -> dict[str, Any]:
    """{"version", "shard_size", "shards": {name: [[id, key, output sha256, row sha256], ...]}};
    empty if missing, unreadable or of another version (its shards are then rebuilt)."""
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(body, dict) or body.get("version") != SHARD_INDEX_VERSION or not isinstance(body.get("shards"), dict):
        return {}
    return body


def shard_size_of(store: RunStore) -> int | None:
    """The shard size of the run dir's WebDataset shards, None if it has none (yet)."""
    size = _read_shard_index(store.root / SHARDS_DIR / SHARD_INDEX).get("shard_size")
    return size if isinstance(size, int) and size >= 1 else None


def _member(item_id: str, record: dict[str, Any], row: dict[str, Any]) -> list[Any]:
    """What a sample is made of: a shard is rewritten when any of it changes (a redo with new
    output settings, or `verify --repair`, keeps the key but changes the file; a meta_* edit
    changes only the row)."""
    row_sha = hashlib.sha256(to_json(row, sort_keys=True, default=str).encode()).hexdigest()
    return [item_id, record.get("key"), record.get("output_sha256"), row_sha]


def assign_shards(old: dict[str, list], members: dict[str, list], shard_size: int) -> dict[str, list]:
    """Which shard holds which finished item. An item stays in the shard it is in (with its
    current member data); items no longer finished leave theirs; new items fill the
    highest-numbered shard up to shard_size, then new shards, in id order. Pure."""
    shards: dict[str, list] = {}
    placed: set[str] = set()
    for name in sorted(old):
        kept = [members[m[0]] for m in old[name] if isinstance(m, list) and m and m[0] in members and m[0] not in placed]
        if kept:
            shards[name] = kept
            placed.update(m[0] for m in kept)
    pending = [item_id for item_id in sorted(members) if item_id not in placed]
    number = max((int(name[6:12]) for name in shards), default=0)
    while pending:
        name = SHARD_NAME.format(number)
        room = shard_size - len(shards.get(name, []))
        if room > 0:
            shards.setdefault(name, []).extend(members[item_id] for item_id in pending[:room])
            pending = pending[room:]
        number += 1
    return shards


def write_shards(store: RunStore, finished: Finished, shard_size: int) -> list[Path]:
    """Bring the WebDataset shards in line with `finished` (what metadata.jsonl lists):
    every finished item whose output is a file is in exactly one shard. Returns the shards
    written now. Call under export_lock."""
    shards_dir = store.root / SHARDS_DIR
    shards_dir.mkdir(exist_ok=True)
    index_path = shards_dir / SHARD_INDEX
    index = _read_shard_index(index_path)
    old = index.get("shards", {}) if index.get("shard_size") == shard_size else {}
    members, folders = {}, 0
    for item_id, (record, row) in finished.items():
        if (store.root / record["output"]).is_dir():
            folders += 1  # PNG frames: a folder, not a file a tar sample can hold
            continue
        members[item_id] = _member(item_id, record, row)
    if folders:
        log.warning("%d finished items are PNG frame folders: not packed into WebDataset shards", folders)
    shards = assign_shards(old, members, shard_size)
    written = []
    for name, entries in sorted(shards.items()):
        if old.get(name) == entries and (shards_dir / name).is_file():
            continue  # already written with exactly these samples
        with atomic_path(shards_dir / name) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as archive:
            for item_id, *_ in entries:
                record, row = finished[item_id]
                video = store.root / record["output"]
                _add_member(archive, f"{sample_key(item_id)}{video.suffix}", video.read_bytes())
                _add_member(archive, f"{sample_key(item_id)}.json", to_json(row, sort_keys=True).encode())
        written.append(shards_dir / name)
    body = {"version": SHARD_INDEX_VERSION, "shard_size": shard_size, "shards": shards}
    atomic_write_bytes(index_path, to_json(body, indent=1, sort_keys=True).encode())
    for stale in sorted(shards_dir.glob("shard-*.tar")):
        if stale.name not in shards:  # emptied, or left by an older index
            stale.unlink(missing_ok=True)
            log.info("removed WebDataset shard %s: none of its items is finished any more", stale.name)
    return written


def write_dataset(store: RunStore, output: OutputConfig | None = None) -> None:
    """metadata.jsonl and, with output.webdataset (or once the run dir has shards), the
    WebDataset shards, from what the run dir holds now. At the end of every run, after
    `verify --repair`: any process may call it, at any time."""
    with export_lock(store):
        finished = without_duds(finished_rows(store), output is not None and bool(output.include_duds))
        write_metadata_rows(store, finished)
        if output is not None and output.webdataset:
            if OutputFormat(output.format) is OutputFormat.frames:
                log.warning("output.webdataset needs a video file format (mp4, gif, webp), not frames: no shards written")
                return
            shard_size: int | None = output.shard_size
        else:
            # Shards once made are kept current by every later run, asked for or not: a
            # stale export is worse than none.
            shard_size = shard_size_of(store)
        if shard_size is None:
            return
        written = write_shards(store, finished, shard_size)
        if written:
            log.info("wrote %d WebDataset shard(s) into %s", len(written), store.root / SHARDS_DIR)


def stale_exports(store: RunStore) -> list[str]:
    """What metadata.jsonl and the WebDataset shards list that the run dir does not hold as
    finished (a video since deleted or set aside, by a user or a run stopped before it could
    rewrite them): each problem names the file and up to 5 ids. `svdbatch verify` reports
    these; write_dataset fixes them."""
    finished = {item_id for item_id, record in store.finished_index().items() if output_intact(store.root, record)}
    problems = []
    listed: dict[str, str] = {}
    try:
        for row in map(json.loads, (store.root / METADATA_FILE).read_bytes().splitlines()):
            listed[str(row.get("id"))] = str(row.get("file_name"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(f"{METADATA_FILE} cannot be read ({exc})")
    gone = sorted(i for i, name in listed.items() if i not in finished or not (store.root / name).exists())
    if gone:
        problems.append(
            f"{METADATA_FILE} lists {len(gone)} item(s) that are not finished or whose file is missing: {_some(gone)}"
        )
    shards = _read_shard_index(store.root / SHARDS_DIR / SHARD_INDEX).get("shards", {})
    packed = {m[0] for members in shards.values() for m in members if isinstance(m, list) and m}
    if packed - finished:
        problems.append(
            f"{SHARDS_DIR}/ holds {len(packed - finished)} item(s) that are not finished: {_some(sorted(packed - finished))}"
        )
    return problems


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
