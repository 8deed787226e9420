"""flock where it works: file systems where it fails (ENOLCK: NFS without lockd; ENOSYS or
EOPNOTSUPP: Lustre mounted without -o flock, some FUSE file systems) get a warning, once,
and go on without the lock. Only used where a lock saves work, never for correctness:
claims and records need no lock (rundir/claims.py, rundir/records.py)."""

from __future__ import annotations

import errno
import fcntl
import logging

log = logging.getLogger(__name__)

NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_warned: set[str] = set()


def lock_or_go_on(fd: int, what: str) -> bool:
    """Take an exclusive flock on `fd` (blocking); False, with a warning once per `what`,
    where the file system has no working flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        if what not in _warned:
            _warned.add(what)
            log.warning("%s: this file system does not support flock (%s); going on without the lock", what, exc.strerror)
        return False
