"""The compact index a resume plans from, and its snapshot in the run dir's cache.

The index holds, per item id, the fields of its latest results record that planning reads
(ResumeRecord). Built from the records alone it decodes every results line ever written:
most of a restart of a million finished items. So the index is kept in
cache/resume-index.marshal together with how many bytes of each results file it covers; a
restart loads it and decodes only what was appended since (records files are append-only,
one writer each; records.py), and saves it again when that was much.

The snapshot is a cache, never the truth: it is used only while every file it covers is
still there, the same file (inode), at least as long, and ending with the same bytes at the
covered offset; otherwise, or when it is unreadable or of another version or Python, the
index is rebuilt from the records. The latest record per id wins by `recorded_ns` across
files, exactly as in a full read: a snapshot's record is replaced by an appended one that is
not older (redo, removal, meta update).
"""

from __future__ import annotations

import logging
import marshal
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from svdbatch.core.atomic import temp_prefix
from svdbatch.core.gc_pause import paused_gc
from svdbatch.core.jsonl import parse_jsonl
from svdbatch.rundir import records

log = logging.getLogger(__name__)

SNAPSHOT = "resume-index.marshal"  # in the run dir's cache/
# 2: length-prefixed marshal chunks of (ids, rows); the Python version is part of it (marshal's format is per version)
VERSION = f"svdbatch-resume-index-2-py{sys.version_info[0]}.{sys.version_info[1]}-m{marshal.version}"
SAVE_AFTER_BYTES = 8 << 20  # a load that decoded at least this much of the records saves a snapshot
SLICE_BYTES = 4 << 20  # records decoded this many bytes at a time: never a whole 600 MB file
CHUNK = 1 << 18  # ids per marshal chunk: loading holds one chunk's plain rows at a time
TAIL = 64  # bytes before a covered offset kept to recognise the file again


class ResumeRecord(NamedTuple):
    """The fields of an item's latest results record that planning a resume reads;
    `get` reads it as the record's dict is read."""

    id: str
    key: str | None
    output: str | None
    output_bytes: int | None
    sidecar_bytes: int | None
    output_key: str | None
    image_path: str | None
    image_sha256: str | None
    image_bytes: int | None
    image_mtime_ns: int | None
    meta_sha256: str | None
    recorded_ns: int | None  # which of an id's records is the latest (records.recorded_ns)

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name) if name in self._fields else None
        return default if value is None else value


Index = dict[str, ResumeRecord]
# Per results file (its path relative to the run dir): (inode, bytes covered, the TAIL bytes before)
Covered = dict[str, tuple[int, int, bytes]]

_FIELDS = itemgetter(*ResumeRecord._fields)  # one C call per record, when it has them all
_make = tuple.__new__  # ResumeRecord(...) costs a Python call per record


def fold(latest: Index, shared: dict[Any, Any], part: Iterable[dict[str, Any]]) -> None:
    """Fold results records into the index: an id's record is replaced by one not older
    (records of one file come in order; across files, recorded_ns decides). `shared` keeps
    one object of the values many records repeat (output key, image, meta digest)."""
    one = shared.setdefault
    for record in part:
        try:
            item_id, key, output, size, sidecar, out_key, path, sha, image_size, mtime, meta, at = _FIELDS(record)
        except KeyError:  # an older line, without some fields
            item_id, key, output, size, sidecar, out_key, path, sha, image_size, mtime, meta, at = map(
                record.get, ResumeRecord._fields
            )
        if item_id is None:
            continue
        item_id = str(item_id)
        at = at or 0
        earlier = latest.get(item_id)
        if earlier is not None and (earlier.recorded_ns or 0) > at:
            continue  # another writer's file holds a later record of this item
        values: tuple[Any, ...] = (item_id, key, output, size, one(sidecar, sidecar), one(out_key, out_key), one(path, path))
        values += (one(sha, sha), one(image_size, image_size), one(mtime, mtime), one(meta, meta), at)
        latest[item_id] = _make(ResumeRecord, values)


def compact_index(root: Path, cache_dir: Path, save_after: int | None = None) -> Index:
    """The index of the run dir: its snapshot brought up to date, or built from the records;
    saved when this decoded at least `save_after` bytes (a best effort: it is a cache)."""
    root = Path(root)
    snapshot = Path(cache_dir) / SNAPSHOT
    with paused_gc():  # millions of small objects, no cycles (gc_pause.py)
        latest, covered = load(snapshot, root)
        decoded = update(latest, covered, root)
    if decoded >= (SAVE_AFTER_BYTES if save_after is None else save_after):
        save(snapshot, latest, covered)
    return latest


def update(latest: Index, covered: Covered, root: Path) -> int:
    """Fold in every results record past what `covered` says is in `latest` already;
    returns how many bytes that decoded."""
    shared: dict[Any, Any] = {}
    decoded = 0
    for path in records.results_files(root):
        name = path.relative_to(root).as_posix()
        offset = covered[name][1] if name in covered else 0
        try:
            found = _fold_file(latest, shared, path, offset)
        except FileNotFoundError:
            continue
        if found[1]:
            covered[name] = found
            decoded += found[1] - offset
    return decoded


def _fold_file(latest: Index, shared: dict[Any, Any], path: Path, offset: int) -> tuple[int, int, bytes]:
    """Fold in one results file's whole lines past `offset`: its (inode, new offset, tail).
    A torn last line (a writer killed mid-line) is skipped by every reader; the snapshot
    covers only whole lines, so a live writer's line is read once it is complete."""
    with open(path, "rb") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        handle.seek(offset)
        for data in complete_slices(handle):
            fold(latest, shared, parse_jsonl(data, path))
            offset += len(data)
        return inode, offset, tail_before(handle, offset)


def complete_slices(handle: Any, size: int = SLICE_BYTES) -> Iterator[bytes]:
    """The whole lines from the handle's position to its end, about `size` bytes at a time."""
    rest = b""
    while True:
        block = handle.read(size)
        if not block:
            return
        data = rest + block
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut]


def tail_before(handle: Any, offset: int) -> bytes:
    start = max(0, offset - TAIL)
    return os.pread(handle.fileno(), offset - start, start)


def still_covers(root: Path, covered: Covered) -> bool:
    """Every file the snapshot covers is the same file, not cut: appended to at most."""
    for name, (inode, offset, tail) in covered.items():
        try:
            with open(root / name, "rb") as handle:
                info = os.fstat(handle.fileno())
                if info.st_ino != inode or info.st_size < offset or tail_before(handle, offset) != tail:
                    return False
        except OSError:
            return False
    return True


def load(snapshot: Path, root: Path) -> tuple[Index, Covered]:
    """The snapshot's index and coverage, or empty ones (rebuild) when it is missing,
    unreadable, of another version, or the files it covers changed other than by appends."""
    try:
        with open(snapshot, "rb") as handle:
            header = marshal.loads(_block(handle))
            if not (isinstance(header, tuple) and len(header) == 3 and header[0] == VERSION):
                return {}, {}
            _, covered, chunks = header
            if not still_covers(root, covered):
                log.info("the resume snapshot %s is out of date (records changed); rebuilding it", snapshot)
                return {}, {}
            latest: Index = {}
            for _ in range(chunks):
                ids, rows = marshal.loads(_block(handle))
                latest.update(zip(ids, map(_make, repeat(ResumeRecord), rows), strict=True))
                del ids, rows  # one chunk's plain rows at a time
            return latest, covered
    except FileNotFoundError:
        return {}, {}
    except (OSError, EOFError, ValueError, TypeError) as exc:
        log.warning("could not read the resume snapshot %s (%s); rebuilding it", snapshot, exc)
        return {}, {}


def _block(handle: Any) -> bytes:
    """One length-prefixed block (marshal.load from a file reads object by object: slow)."""
    size = int.from_bytes(handle.read(8), "little")
    if not 0 < size <= os.fstat(handle.fileno()).st_size - handle.tell():
        raise EOFError("the snapshot ends early")
    return handle.read(size)


def _write_block(handle: Any, value: Any) -> None:
    data = marshal.dumps(value)
    handle.write(len(data).to_bytes(8, "little"))
    handle.write(data)


def save(snapshot: Path, latest: Index, covered: Covered) -> None:
    """Write the snapshot atomically (temporary + rename): a reader sees the old one or the
    new one, never half of one; two processes saving at once leave one complete snapshot."""
    tmp = snapshot.with_name(f"{temp_prefix(snapshot.stem)}{threading.get_ident()}.tmp")
    ids = list(latest)
    try:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            _write_block(handle, (VERSION, covered, (len(ids) + CHUNK - 1) // CHUNK))
            for start in range(0, len(ids), CHUNK):
                part = ids[start : start + CHUNK]
                _write_block(handle, (part, [tuple(latest[i]) for i in part]))
        os.replace(tmp, snapshot)
    except OSError as exc:  # a full or read-only disk: the next restart decodes the records again
        log.debug("could not save the resume snapshot %s: %s", snapshot, exc)
        tmp.unlink(missing_ok=True)


def refresh(root: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> None:
    """Bring the snapshot up to date with the records (a run's end, or while it runs), so
    the next restart decodes only what comes after."""
    compact_index(Path(root), Path(cache_dir), save_after=1)
