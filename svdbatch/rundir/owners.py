"""Which processes are running on a run dir: each run's owner file, owners/<pid>@<host>.json,
its heartbeat, and how a reader judges it live or dead (status, the next run's clean-up)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import HOST, atomic_write_bytes
from svdbatch.rundir.claims import MISSED_BEATS, holder_state, process_start_ticks

OWNERS_DIR = "owners"  # owners/<pid>@<host>.json: processes running on the run dir
HEARTBEAT_S = 30.0  # an owner file's mtime is refreshed this often while its run is alive
OWNER_STALE_AFTER_S = MISSED_BEATS * HEARTBEAT_S  # another host's owner without a heartbeat for this long is gone


class Owner:
    """While a run works on a run dir: owners/<pid>@<host>.json (pid, host, start time),
    its mtime refreshed every HEARTBEAT_S by a daemon thread, removed on a clean exit. A
    killed run leaves it behind; `owner_state` then finds its pid gone (same host)."""

    def __init__(self, root: Path, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(root) / OWNERS_DIR / f"{os.getpid()}@{HOST}.json"
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Owner:
        record = {
            "pid": os.getpid(),
            "host": HOST,
            "process_start": process_start_ticks(os.getpid()),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(record, sort_keys=True).encode() + b"\n")
        self._thread = threading.Thread(target=self._beat, name="svdbatch-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):  # a full or vanished disk: status just sees an older heartbeat
                os.utime(self.path)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):  # a read-only run dir: the next run removes it (its pid is gone)
            self.path.unlink(missing_ok=True)


def read_owners(run_dir: Path) -> list[dict[str, Any]]:
    """The owner records of a run dir, each with `updated` (mtime, epoch seconds)."""
    folder = Path(run_dir) / OWNERS_DIR
    if not folder.is_dir():
        return []
    owners = []
    for entry in os.scandir(folder):
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        try:
            record = json.loads(Path(entry.path).read_bytes())
            updated = entry.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            continue  # removed meanwhile, or torn
        if isinstance(record, dict) and isinstance(record.get("pid"), int):
            owners.append({**record, "file": entry.path, "updated": updated})
    return owners


def owner_state(owner: dict[str, Any], now: float | None = None) -> str:
    """'running' or 'dead' for a process on this host (its pid, and the pid's start time
    where known); for another host's, 'unknown' while its heartbeat is fresh and 'dead'
    after MISSED_BEATS heartbeats (claims.holder_state: claims are judged the same way)."""
    return holder_state(owner, float(owner.get("updated", 0.0)), now, OWNER_STALE_AFTER_S)
