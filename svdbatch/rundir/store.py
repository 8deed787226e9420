"""The run directory: the names of its files, what is done, commits, claims.

Layout of a run dir::

    config.yaml          resolved config of the run (without hydra's own settings)
    layout.json          the layout version (layout.py): 2 groups items in subfolders
    videos/<bucket>/<id>.mp4   one output per item (or videos/<bucket>/<id>/ with PNG frames)
    items/<bucket>/<id>.json   sidecar: row, params, seed, input hash, model, versions, timings (sidecar.py)
    records/<writer>.results.jsonl   one line per finished item, one file per writing process (records.py)
    records/<writer>.failures.jsonl  one line per failed attempt (error + traceback)
    records/<writer>.summary.json    counts and recent finishes, what `svdbatch status` reads (summaries.py)
    claims/<id>.claim    lease of the process generating the item (claims.py), deleted on release
    cache/               image checks and hashes by (path, size, mtime), manifest summaries,
                         the resume snapshot (resume_index.py)
    owners/<pid>@<host>.json  one per process running on the dir (pid, host, start time),
                         touched every HEARTBEAT_S, removed on exit: what makes it "live"
    replaced/<stamp>/    videos/ and items/ of finished items a later run redid with other
                         settings (run.keep_replaced), one folder per run, UTC time it started
    index.html, gallery/ contact sheet and its thumbnails (gallery.py)
    metadata.jsonl       dataset index of finished items (dataset.py)

<bucket> is layout.bucket(id) (3 hex digits of sha1(id)). Run dirs of older versions
(layout 1: flat videos/<id>.mp4 and items/<id>.json, one shared results.jsonl and
failures.jsonl) are read and resumed as they are (layout.py, records.py).

An item is done when its video and then its sidecar have been renamed into place, its
results line vouches for both (their byte sizes), and the line's two keys match what the
current config gives that item: the key (everything that determines the frames) and the
output key (everything that shapes the written file: format, fps, quality, loop, encoder;
outputs.output_settings; keys.py). Resume checks this with two stats per item (intact.py);
`svdbatch verify` (verify.py) checks every byte. What a killed run left is cleared by the
next one (cleanup.py); a redo sets the old files aside first (replacing.py); an item another
run dir finished with the same key is linked, not generated (reuse.py).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, overload

from svdbatch.core.atomic import DISK_FULL_ERRNOS, atomic_write_bytes, temp_prefix
from svdbatch.core.config import OutputFormat
from svdbatch.core.errors import RunDirError
from svdbatch.core.faults import fault_point
from svdbatch.rundir import claims as leases
from svdbatch.rundir import record_writer, records, resume_index
from svdbatch.rundir.claims import Claim
from svdbatch.rundir.cleanup import STALE_TEMP_SECONDS, remove_dead_owners, remove_stale_claims, remove_temporaries, subfolders
from svdbatch.rundir.intact import output_intact, resume_intact
from svdbatch.rundir.layout import (
    FLAT,
    LAYOUT_FILE,
    SIDECARS_DIR,
    VIDEOS_DIR,
    item_relpath,
    layout_version,
    make_parents,
    sidecar_relpath,
    write_layout,
)
from svdbatch.rundir.outputs import output_name
from svdbatch.rundir.owners import Owner
from svdbatch.rundir.resume_index import ResumeRecord
from svdbatch.rundir.sidecar import Sidecar, body_bytes, result_record
from svdbatch.rundir.sidecar_fields import SidecarError, SidecarRow
from svdbatch.rundir.summaries import LEGACY_NAME, save_legacy_summary

log = logging.getLogger(__name__)

# The run dir's layout: every other module asks these names instead of spelling them out.
# The shared logs of run dirs written before per-writer records (read, never written: records.py).
RESULTS = records.LEGACY_RESULTS
FAILURES = records.LEGACY_FAILURES
RECORDS_DIR = records.RECORDS_DIR  # records/<writer>.{results,failures}.jsonl, <writer>.summary.json
CONFIG = "config.yaml"  # the resolved config of an unsharded run (write_config)
SHARD_CONFIG_GLOB = "config.shard-*-of-*.yaml"  # a sharded run's config files (write_config)
# VIDEOS_DIR, SIDECARS_DIR: videos/ and items/ (grouped per layout.py)
CLAIMS_DIR = "claims"  # claims/<id>.claim (claims.py)
GALLERY_PAGE = "index.html"  # the contact sheet (gallery.py)
# What marks a folder as a run dir (status refuses other folders; folder manifests skip
# these, so a re-run never reads its own gallery thumbnails as new inputs).
RUN_DIR_MARKERS = (LAYOUT_FILE, RESULTS, FAILURES, CONFIG)
# The error recorded in failures.jsonl for a manifest row that fails validation.
INVALID_ROW = "invalid manifest row"
# Where run dirs go by default: hydra.run.dir in conf/config.yaml is outputs/<run.name>.
OUTPUTS_ROOT = "outputs"
REPLACED_DIR = "replaced"  # replaced/<stamp>/: what run.keep_replaced moved aside
CACHE_DIR = "cache"  # what runs learnt about their inputs (images.ImageCache, status's manifest summary)
DOWNLOADS_DIR = "downloads"  # image URLs, downloaded once (fetch.UrlCache)
METADATA_FILE = "metadata.jsonl"  # the dataset index (dataset.py)
SHARDS_DIR = "webdataset"  # WebDataset tar shards (dataset.py)
SHARD_INDEX = "index.json"  # inside SHARDS_DIR: which items each shard holds
GALLERY_ASSETS_DIR = "gallery"  # the gallery's thumbnails and previews (gallery.py, sweep.py)
DAMAGED_DIR = "damaged"  # damaged/<stamp>/: what `svdbatch verify --repair` set aside
# Said when a run stops because its run dir cannot be written (RunStore.write_stop).
WRITE_STOP_HINT = "free space and run again to resume; a read-only or vanished run dir must be writable again first"


def is_invalid_record(record: dict[str, Any]) -> bool:
    return record.get("id") is None or record.get("error") == INVALID_ROW


def parse_time(text: Any) -> datetime | None:
    """An ISO timestamp as written by the run ('+00:00' or '+0000' offsets); naive = UTC."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"([+-]\d\d)(\d\d)$", r"\1:\2", text.strip()).replace("Z", "+00:00")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


class RunStore:
    """One process's handle on one run dir: the door through which the engine, verify and
    the reports reach it. It is long only in methods (six groups: set-up, paths, what is
    done, claims, replacing, writing); each is a few lines that name a step and hand it to
    the module that owns it (layout, keys, intact, cleanup, claims, replacing, records,
    sidecar), so callers never spell a path or a record's fields themselves."""

    def __init__(self, root: str | os.PathLike[str], fmt: OutputFormat | str) -> None:
        self.root = Path(root)
        self._root_text = os.fspath(self.root)  # is_done runs per row: Path -> str costs 2 us each time
        self.format = OutputFormat(fmt)
        self.layout = layout_version(self.root)  # FLAT for a run dir of an older version (layout.py)
        self.videos = self.root / VIDEOS_DIR
        self.sidecars = self.root / SIDECARS_DIR
        self.records = self.root / RECORDS_DIR
        self.claims = self.root / CLAIMS_DIR
        self._replacing: set[str] = set()  # items set aside for a redo (commit marks their line)
        self.cache = self.root / CACHE_DIR
        self.downloads = self.root / DOWNLOADS_DIR
        self.image_cache = self.cache / "images.jsonl"

    # -- set-up -----------------------------------------------------------------------
    def prepare(self, min_free_mb: int = 0, buckets: bool = True) -> None:
        """Create the layout, prove it is writable and has room, and clean up after a
        killed run. Runs before the model loads, so a bad run dir costs seconds, not minutes.
        `buckets=False` leaves the temporaries of videos/ and items/ bucket folders (a big
        run dir's million entries) to remove_stale_temporaries(only_buckets=True), which
        the driver runs once dispatch has started."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_layout(self.root, self.layout)  # before items/ exists: a new run dir is grouped
            for folder in (self.videos, self.sidecars, self.claims, self.records):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"run dir {self.root} is not writable: {exc}") from exc
        free_mb = shutil.disk_usage(self.root).free / 2**20
        if free_mb < min_free_mb:
            raise RunDirError(
                f"run dir {self.root}: only {free_mb:.0f} MB free, run.min_free_mb={min_free_mb}; free some space or lower the setting"
            )
        # Torn last lines of killed writers are skipped by every reader (records.py): each
        # writer's file is its own, nobody appends to a dead writer's file again.
        if (self.root / RESULTS).is_file() and not (self.records / f"{LEGACY_NAME}{records.SUMMARY_SUFFIX}").is_file():
            save_legacy_summary(self.root)  # an old run dir: status reads this, not the old log
        self.remove_stale_temporaries(buckets=buckets)
        remove_dead_owners(self.root)
        remove_stale_claims(self.claims)

    def owner(self) -> Owner:
        return Owner(self.root)

    def remove_stale_temporaries(
        self, older_than_s: float = STALE_TEMP_SECONDS, buckets: bool = True, only_buckets: bool = False
    ) -> int:
        """Delete temporaries a killed run left behind: those whose writer (on this host) is
        dead, and old ones from elsewhere. A fresh one may belong to a live process (a
        second worker, or a shard on another node sharing this dir). `buckets`: also in the
        bucket folders of videos/ and items/; `only_buckets`: only there."""
        grouped = [Path(e.path) for f in (self.videos, self.sidecars) for e in subfolders(f)] if self.layout != FLAT else []
        folders = [*grouped] if buckets else []
        if not only_buckets:
            folders += [self.videos, self.sidecars, self.root, self.records, self.claims, *self._asset_folders()]
        return remove_temporaries(folders, time.time() - older_than_s)

    def _asset_folders(self) -> list[Path]:
        """The URL cache, shards, thumbnails and caches: written with the same atomic writer."""
        extra = [
            folder
            for folder in (self.root / name for name in (DOWNLOADS_DIR, SHARDS_DIR, GALLERY_ASSETS_DIR, CACHE_DIR))
            if folder.is_dir()
        ]
        # gallery/<bucket>/ (layout.asset_relpath) and downloads/<bucket>/ (fetch.UrlCache.path_for)
        return extra + [Path(e.path) for name in (GALLERY_ASSETS_DIR, DOWNLOADS_DIR) for e in subfolders(self.root / name)]

    def lost(self) -> str | None:
        """Why nothing can be written into the run dir any more (it was deleted, a folder
        of its layout is gone, it turned read-only or unwritable), or None while it can."""
        if not self.root.is_dir():
            return f"run dir {self.root} vanished"
        for folder in (self.videos, self.sidecars, self.claims):
            if not folder.is_dir():
                return f"run dir {self.root} vanished in part ({self.relative(folder)}/ is gone)"
        if not os.access(self.root, os.W_OK):  # also false on a read-only file system
            return f"run dir {self.root} is no longer writable"
        return None

    def write_stop(self, exc: OSError) -> str | None:
        """The reason to stop the whole run for this write error, or None when it is one
        item's: a full or read-only disk (errno), or a run dir that is gone or unwritable,
        which every later write would meet too."""
        if exc.errno in DISK_FULL_ERRNOS:
            return f"{type(exc).__name__}: {exc}"
        return self.lost()

    def write_config(self, text: str, shard_index: int = 0, shard_count: int = 1) -> None:
        name = CONFIG if shard_count == 1 else f"config.shard-{shard_index}-of-{shard_count}.yaml"
        atomic_write_bytes(self.root / name, text.encode())

    # -- paths ------------------------------------------------------------------------
    def video_path(self, item_id: str) -> Path:
        """Where the item's output goes (its bucket folder is created: writers put a
        temporary next to it)."""
        path = self.root / item_relpath(VIDEOS_DIR, output_name(item_id, self.format), item_id, self.layout)
        make_parents(self.videos, path)
        return path

    def sidecar_path(self, item_id: str) -> Path:
        return self.root / sidecar_relpath(item_id, self.layout)

    def probe_path(self, tag: str) -> Path:
        """A small file a process writes to prove it sees this run dir (the Ray engine checks
        that every node does). Named like a temporary (writer's pid and host), so one left
        by a killed run is cleaned up by the next."""
        return self.root / f"{temp_prefix('node-probe')}{tag}"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # -- what is done -----------------------------------------------------------------
    @overload
    def finished_index(self, compact: Literal[False] = False) -> dict[str, dict[str, Any]]: ...
    @overload
    def finished_index(self, compact: Literal[True]) -> dict[str, ResumeRecord]: ...
    def finished_index(self, compact: bool = False) -> dict[str, dict[str, Any]] | dict[str, ResumeRecord]:
        """Latest results record per item id (records.py: every writer's, and an old run
        dir's results.jsonl). `compact` (planning a resume): only what resume reads of each
        (ResumeRecord), the records read in slices: a million finished items take ~0.4 GB
        instead of ~3 GB; kept as a snapshot in cache/, so a restart decodes only the
        records appended since (resume_index.py)."""
        if not compact:
            return records.latest_results(self.root)
        return resume_index.compact_index(self.root, self.cache)

    def is_done(self, item_id: str, key: str | None, out_key: str | None, index: Mapping[str, Any]) -> bool:
        """Done with this key (frames) and output key (file settings); see the module doc."""
        record = index.get(item_id)
        if type(record) is ResumeRecord:  # a compact index (a resume's plan): fields, not .get
            return record.key == key and record.output_key == out_key and resume_intact(self._root_text, record, self.layout)
        if record is None:
            record = self._recover_from_sidecar(item_id, key, out_key)
            if record is None:
                return False
        if record.get("key") != key or record.get("output_key") != out_key:
            return False  # lines from before output keys were recorded: redone (encoder unknown)
        # A results line is appended only after the sidecar was renamed into place, so the
        # line vouches for the sidecar; both files are checked because users delete them.
        return output_intact(self._root_text, record, self.layout)

    def _recover_from_sidecar(self, item_id: str, key: str | None, out_key: str | None) -> dict[str, Any] | None:
        """A run killed between the sidecar rename and the results line: trust the sidecar.
        Only under the item's claim: a live process may be about to append that line itself."""
        if not self.sidecar_path(item_id).is_file():
            return None
        claim = self.claim(item_id)
        if claim is None:
            return None
        try:
            record = self.done_record(item_id, key, out_key)
            if record is not None:
                record_writer.writer(self.root).append_result(record)
            return record
        finally:
            self.release(claim)

    def read_sidecar(self, item_id: str) -> Sidecar | None:
        """An item's sidecar, or None if it is missing or not a sidecar of this version."""
        try:
            return Sidecar.read(self.sidecar_path(item_id))
        except (OSError, SidecarError):
            return None

    def done_record(self, item_id: str, key: str | None, out_key: str | None) -> dict[str, Any] | None:
        """The results record an item's sidecar vouches for, if the sidecar is there, has
        these keys, and its output is complete; else None."""
        try:
            sidecar, size = Sidecar.read_with_size(self.sidecar_path(item_id))
        except (OSError, SidecarError):
            return None
        if not sidecar.done_with(key, out_key):
            return None
        record = sidecar.result_record(size)
        return record if output_intact(self.root, record, self.layout) else None

    # -- claims: several processes sharing one run dir ------------------------------------
    def claim(self, item_id: str) -> Claim | None:
        """Take the item's claim (a lease file, claims.py), or None while another live
        process holds it. A dead holder's claim (its pid gone on this host, or no heartbeat
        for claims.STALE_AFTER_S on any host) is taken over."""
        return leases.take(self.claims, item_id)

    @staticmethod
    def release(claim: Claim | None) -> None:
        leases.release(claim)

    # -- replacing finished items ------------------------------------------------------
    def replaced_dir(self, started: float) -> Path:
        """Where this run keeps the outputs it replaces: replaced/<UTC start time>/."""
        return self.root / REPLACED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))

    def mark_redo(self, item_id: str) -> None:
        """The item's next commit replaces a done one (replacing.set_aside moved it aside): its
        results line is marked a redo, so the summaries count the item done once."""
        self._replacing.add(item_id)

    # -- writing ----------------------------------------------------------------------
    def commit(self, sidecar: Sidecar) -> None:
        """Called after the video is in place: the sidecar rename is what makes an item done.
        A commit over a done item (a redo) is marked so, for the summaries' counts."""
        record = sidecar.to_dict()
        body = body_bytes(record)
        path = self.sidecar_path(sidecar.id)
        redo = sidecar.id in self._replacing or self._done_before(path)
        self._replacing.discard(sidecar.id)
        make_parents(self.sidecars, path)
        atomic_write_bytes(path, body, fault="sidecar")
        fault_point("results")
        line = result_record(record, len(body))
        record_writer.writer(self.root).append_result({**line, "redo": True} if redo else line)

    @staticmethod
    def _done_before(path: Path) -> bool:
        if not os.path.lexists(path):
            return False
        try:
            return Sidecar.read(path).done
        except (OSError, SidecarError):
            return False

    def record_removed(self, item_id: str) -> None:
        """An item is not done any more (verify --repair set it aside): a results line
        without an output, so readers see it not done and the summaries count it out."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record_writer.writer(self.root).append_result({"id": item_id, "removed": True, "removed_at": now})

    def update_row(self, item_id: str, key: str, out_key: str, row: SidecarRow) -> bool:
        """A finished item whose manifest row changed only outside its key (meta_* values):
        its sidecar is rewritten with the new row and a results line appended (marked
        `meta_updated_at`: not a finish, for throughput), so metadata.jsonl and the shards
        follow; the video is not touched. Under the item's claim; False if another process
        holds it, or the item is not done with these keys any more."""
        claim = self.claim(item_id)
        if claim is None:
            return False
        try:
            sidecar = self.read_sidecar(item_id)
            if sidecar is None or not sidecar.done_with(key, out_key):
                return False
            record = replace(sidecar, row=row).to_dict()
            body = body_bytes(record)
            atomic_write_bytes(self.sidecar_path(item_id), body)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record_writer.writer(self.root).append_result({**result_record(record, len(body)), "meta_updated_at": now})
            return True
        finally:
            self.release(claim)

    def record_failure(self, item_id: str | None, key: str | None, error: str, details: dict[str, Any]) -> None:
        self.record_failures([(item_id, key, error, details)])

    def record_failures(self, failures: list[tuple[str | None, str | None, str, dict[str, Any]]]) -> None:
        """Several failures (id, key, error, details), in one write and one fsync: the 10k
        invalid rows of a big manifest must not cost 10k fsyncs."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record_writer.writer(self.root).append_failures(
            [{"id": i, "key": k, "error": e, "time": stamp, **d} for i, k, e, d in failures]
        )
