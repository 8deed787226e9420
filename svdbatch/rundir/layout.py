"""Where an item's files lie in a run dir: the one module that spells the per-item paths.

A run dir of layout 2 (every run dir this version creates) groups per-item files in
subfolders named by the first BUCKET_CHARS hex digits of sha1(id)::

    items/<bucket>/<id>.json     videos/<bucket>/<id>.mp4  (or videos/<bucket>/<id>/ of frames)

4096 buckets keep every folder under ~10k entries up to ~40M items (img2dataset groups by
10k for the same reason: listing, rsync and NFS lookups slow down with folder size). The
bucket is a pure function of the id, so no index is needed to find an item.

A run dir of layout 1 (written by svdbatch before the grouping) keeps `items/<id>.json`
and `videos/<id>.mp4` flat. It is read and resumed as it is: its new items go where its
old ones are, so every item of one run dir follows one rule. The version is recorded in
`layout.json` (RunStore.prepare writes it); a run dir without one is layout 1 when it has
anything in it already (an old run dir), else layout 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

LAYOUT_FILE = "layout.json"
FLAT = 1  # items/<id>.json, videos/<id>.<ext>: run dirs of older versions
GROUPED = 2  # items/<bucket>/<id>.json, videos/<bucket>/<id>.<ext>
CURRENT = GROUPED
BUCKET_CHARS = 3  # 16**3 = 4096 buckets
VIDEOS_DIR = "videos"
SIDECARS_DIR = "items"
# What an old run dir has in it before it ever had a layout file.
_OLD_MARKERS = ("results.jsonl", "failures.jsonl", SIDECARS_DIR, VIDEOS_DIR)

_known: dict[str, int] = {}  # run dir -> version read from its layout file (never changes once written)


def bucket(item_id: str) -> str:
    """The subfolder of an item in a grouped layout: stable across runs, hosts and versions."""
    return hashlib.sha1(item_id.encode()).hexdigest()[:BUCKET_CHARS]


def layout_version(root: str | os.PathLike[str]) -> int:
    """The layout of a run dir: its layout.json, else FLAT for a run dir written before
    layouts were recorded, else CURRENT (a new or empty folder)."""
    key = os.fspath(root)
    known = _known.get(key)
    if known is not None:
        return known
    version = _recorded(key)
    if version is None:
        if not any(os.path.lexists(os.path.join(key, name)) for name in _OLD_MARKERS):
            return CURRENT
        # Read again after seeing the markers: RunStore.prepare writes layout.json before
        # items/ and videos/, so a new run dir prepared between the two looks here (a worker
        # started while the driver prepares) has its file now; only an old one still has none.
        version = _recorded(key)
        if version is None:
            return FLAT
    _known[key] = version
    return version


def _recorded(root: str) -> int | None:
    try:
        return int(json.loads(Path(root, LAYOUT_FILE).read_bytes())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget_layouts() -> None:
    """Drop what this process learnt of run dirs' layouts (a test that rewrites one by hand)."""
    _known.clear()


def write_layout(root: Path, version: int) -> None:
    """Record the layout (once: an existing file is left alone)."""
    path = root / LAYOUT_FILE
    if path.exists():
        return
    tmp = root / f".{LAYOUT_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(json.dumps({"version": version}).encode() + b"\n")
    os.replace(tmp, path)


def item_relpath(folder: str, name: str, item_id: str, version: int) -> str:
    """'<folder>/<name>' (flat) or '<folder>/<bucket>/<name>' (grouped): `name` is the file
    name made from the id (`<id>.json`, `<id>.mp4`)."""
    return f"{folder}/{name}" if version == FLAT else f"{folder}/{bucket(item_id)}/{name}"


def make_parents(base: Path, path: Path) -> None:
    """Create the folders between `base` and `path` (a bucket, an id's own subfolders),
    never `base` or anything above it: a write still in flight must not re-create a run
    dir (or its items/, videos/) deleted meanwhile. FileNotFoundError if `base` is gone."""
    missing = []
    parent = path.parent
    while parent != base and base in parent.parents and not parent.is_dir():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)


GALLERY_DIR = "gallery"  # thumbnails, previews and posters of the pages (gallery.py, sweep.py)


def asset_relpath(item_id: str, suffix: str) -> str:
    """gallery/<bucket>/<id><suffix>: a page's thumbnail, preview or poster of an item,
    grouped like the items in every layout (they are a cache: an old run dir's flat ones
    are simply made again)."""
    return f"{GALLERY_DIR}/{bucket(item_id)}/{item_id}{suffix}"


def sidecar_relpath(item_id: str, version: int = CURRENT) -> str:
    return item_relpath(SIDECARS_DIR, f"{item_id}.json", item_id, version)


def sidecar_path_in(root: str | os.PathLike[str], item_id: str) -> Path:
    """An item's sidecar in a run dir of either layout."""
    return Path(root) / sidecar_relpath(item_id, layout_version(root))


def id_from_relpath(relative: str, version: int) -> str:
    """The item id of a sidecar path relative to items/ ('<bucket>/<id>.json' or '<id>.json')."""
    stem = relative[: -len(".json")] if relative.endswith(".json") else relative
    return stem.split("/", 1)[1] if version == GROUPED and "/" in stem else stem
