"""Claims without flock: which process is generating an item, on any shared file system.

A claim is a lease file `claims/<id>.claim` created atomically (a temporary hard-linked to
the name, which fails if the name exists; O_CREAT|O_EXCL where hard links are not
supported) holding its holder's host, pid, process start time and a token. The holder
refreshes the file's mtime every HEARTBEAT_S (a daemon thread) and deletes it on release,
so claims/ holds only the claims of items being generated now, whatever the run's size.

A claim is stale, and may be taken over, when
  * its holder ran on this host and is gone (pid absent, or reused: its start time differs), or
  * its heartbeat is older than STALE_AFTER_S (MISSED_BEATS heartbeats), whatever the host:
    a process on another host is never judged by its pid here.
Taking over goes through `<claim>.takeover`, created exclusively: of two processes that find
the same stale claim, one replaces it and the other sees a busy item. The same rules judge
owner files (owners.Owner): `holder_state`.

Nothing here uses flock, so file systems where it fails (ENOLCK or ENOSYS: NFS without
lockd, Lustre without -o flock) work the same as local disks. Clocks: the heartbeat is
compared with this host's clock, so hosts should run NTP (a skew under STALE_AFTER_S is
harmless).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import HOST, proc_stat_fields, process_alive, temp_prefix
from svdbatch.rundir.layout import make_parents

CLAIM_SUFFIX = ".claim"
TAKEOVER_SUFFIX = ".takeover"
# A minute between heartbeats, stale after 3 missed: well above what NFS clients cache file
# attributes for (acregmax, 60 s by default), so a live holder never looks stale elsewhere.
HEARTBEAT_S = float(os.environ.get("SVDBATCH_CLAIM_HEARTBEAT_S", "60"))
MISSED_BEATS = 3
STALE_AFTER_S = MISSED_BEATS * HEARTBEAT_S
# errno of a file system without hard links: fall back to O_EXCL creation.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS})


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat field 22), so a
    recycled pid is not taken for the process that died; None where /proc is not available."""
    fields = proc_stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


_MY_START: dict[int, int | None] = {}


def my_identity() -> dict[str, Any]:
    pid = os.getpid()
    if pid not in _MY_START:
        _MY_START[pid] = process_start_ticks(pid)
    return {"host": HOST, "pid": pid, "process_start": _MY_START[pid]}


def holder_state(holder: dict[str, Any], updated: float, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> str:
    """'running', 'dead' or 'unknown' for the holder of a claim or owner file (`updated`:
    its heartbeat, the file's mtime). This host's processes are judged by pid and start
    time; another host's are 'unknown' while their heartbeat is fresh and 'dead' after
    `stale_after_s` without one."""
    now = time.time() if now is None else now
    if holder.get("host") != HOST:
        return "dead" if now - updated > stale_after_s else "unknown"
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return "dead" if now - updated > stale_after_s else "unknown"
    if not process_alive(pid):
        return "dead"
    recorded, current = holder.get("process_start"), process_start_ticks(pid)
    if recorded is not None and current is not None and recorded != current:
        return "dead"  # the pid was reused by another process
    return "running"


@dataclass
class Claim:
    path: Path
    token: str


def claim_path(claims_dir: Path, item_id: str) -> Path:
    return claims_dir / f"{item_id}{CLAIM_SUFFIX}"


def read_claim(path: Path) -> tuple[dict[str, Any], float] | None:
    """(holder, heartbeat time) of a claim file, None if there is none. A file being
    written (empty) reads as a holder of this host without a pid: fresh until it ages."""
    try:
        data = path.read_bytes()
        updated = path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        holder = json.loads(data) if data else {}
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), updated


def is_stale(path: Path, now: float | None = None) -> bool:
    found = read_claim(path)
    if found is None:
        return True
    holder, updated = found
    return holder_state(holder, updated, now) == "dead"


def _create(path: Path, body: bytes) -> bool:
    """Create `path` holding `body`, atomically; False if it exists."""
    tmp = path.with_name(f"{temp_prefix(path.stem)}{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(body)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        try:  # no hard links here: exclusive create, then the body
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class Heartbeat:
    """Refreshes the mtime of every claim this process holds (one daemon thread)."""

    def __init__(self) -> None:
        self.held: dict[Path, str] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()

    def add(self, claim: Claim) -> None:
        with self.lock:
            self.held[claim.path] = claim.token
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="svdbatch-claims", daemon=True)
                self.thread.start()

    def remove(self, claim: Claim) -> None:
        with self.lock:
            self.held.pop(claim.path, None)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                paths = list(self.held)
            for path in paths:
                with contextlib.suppress(OSError):  # taken over, or a vanished run dir: the commit finds out
                    os.utime(path)


_heartbeats: dict[int, Heartbeat] = {}


def _heartbeat() -> Heartbeat:
    pid = os.getpid()  # a forked child starts its own thread
    if pid not in _heartbeats:
        _heartbeats[pid] = Heartbeat()
    return _heartbeats[pid]


def take(claims_dir: Path, item_id: str) -> Claim | None:
    """The item's claim for this process, or None while another live process holds it."""
    path = claim_path(claims_dir, item_id)
    if "/" in item_id:
        make_parents(claims_dir, path)
    token = secrets.token_hex(8)
    body = json.dumps({**my_identity(), "token": token, "taken_at": time.time()}).encode()
    for _ in range(3):
        if _create(path, body):
            claim = Claim(path, token)
            _heartbeat().add(claim)
            return claim
        found = read_claim(path)
        if found is None:
            continue  # released meanwhile: try again
        holder, updated = found
        if holder_state(holder, updated) != "dead":
            return None
        if not _take_over(path, holder.get("token")):
            return None
    return None


def _take_over(path: Path, stale_token: Any) -> bool:
    """Remove a stale claim, under `<claim>.takeover` so that only one process does."""
    lock = path.with_name(path.name + TAKEOVER_SUFFIX)
    if not _create(lock, json.dumps(my_identity()).encode()):
        if is_stale(lock) or _older_than(lock, STALE_AFTER_S):
            lock.unlink(missing_ok=True)  # a taker that died mid-takeover
        return False
    try:
        found = read_claim(path)
        if found is not None and found[0].get("token") == stale_token:
            path.unlink(missing_ok=True)
        return True
    finally:
        lock.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return True


def release(claim: Claim | None) -> None:
    """Delete the claim if it is still ours (a claim taken over after missed heartbeats is
    the new holder's)."""
    if claim is None:
        return
    _heartbeat().remove(claim)
    # Never raises: a release runs in `finally` blocks, also when the run dir just turned
    # read-only or vanished (the claim then goes stale and the next run takes it over).
    with contextlib.suppress(OSError):
        found = read_claim(claim.path)
        if found is not None and found[0].get("token") == claim.token:
            claim.path.unlink(missing_ok=True)


def held_claims(claims_dir: Path, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Item id -> holder of every claim that is not stale (what `svdbatch status` calls in
    progress). Reads only claims/: released claims are deleted, so it holds a few files."""
    held: dict[str, dict[str, Any]] = {}
    if not claims_dir.is_dir():
        return held
    for folder, _, files in os.walk(claims_dir):
        for name in files:
            if not name.endswith(CLAIM_SUFFIX) or name.startswith("."):
                continue
            path = Path(folder, name)
            found = read_claim(path)
            if found is None:
                continue
            holder, updated = found
            if holder_state(holder, updated, now) != "dead":
                item_id = path.relative_to(claims_dir).as_posix()[: -len(CLAIM_SUFFIX)]
                held[item_id] = holder
    return held
