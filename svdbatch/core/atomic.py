"""Atomic file I/O every module writes through: a temporary next to the target, fsynced,
then renamed, so a killed process leaves the old file, the new file or a stray temporary,
never a torn file under the real name.

Temporaries are named after their writer (pid and host) so a later run can remove the
leftovers of a dead process at once and leave a live one's alone (store.RunStore.prepare).
Light on purpose (no numpy, PIL): the manifest, status and fetch code import it at start-up.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from svdbatch.core.faults import fault_point

TEMP_MARKER = ".partial-"
# errno of a write error that no later write escapes either (the run stops: RunStore.write_stop, engine/commit.py).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_HOST = socket.gethostname().replace("@", "_")[:64]
HOST = _HOST  # this machine, as named in temporaries and owner files (owners.Owner)


def temp_prefix(stem: str) -> str:
    """'.<stem>.partial-<pid>@<host>@': who wrote a temporary, so a later run can delete
    the leftovers of a dead process at once (and leave a live one's alone). The stem is
    only a hint for humans: cut to 60 bytes so a 200-byte id stays under NAME_MAX (255)."""
    short = stem.encode()[:60].decode(errors="ignore")
    return f".{short}{TEMP_MARKER}{os.getpid()}@{_HOST}@"


def temp_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of a temporary's writer, or None if `name` is not one of ours."""
    at = name.rfind(TEMP_MARKER)
    if at < 0:
        return None
    pid, _, rest = name[at + len(TEMP_MARKER) :].partition("@")
    host, found, _ = rest.partition("@")
    return (int(pid), host) if pid.isdigit() and found else None


def process_alive(pid: int) -> bool:
    """A process of this host with this pid exists and has not exited. A killed process
    whose parent has not reaped it yet (a zombie: a worker whose driver was killed with it,
    until init collects it) is dead: it holds no files and writes nothing more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    fields = proc_stat_fields(pid)
    if not fields:
        return True  # no /proc (macOS): kill() said it exists
    return fields[0] not in ("Z", "X")  # the state


def proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses):
    field 3 (the state) first; None where /proc is not available or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split() if ")" in text else None


def written_by_dead_process(name: str) -> bool:
    owner = temp_owner(name)
    if owner is None or owner[1] != _HOST:
        return False  # another machine's process (shared file system): cannot tell
    return not process_alive(owner[0])


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, and setting
    it twice would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the racy way
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file or folder: mkstemp/mkdtemp create
    theirs 0600/0700, which would keep colleagues and a web server out of the run dir."""
    return (0o777 if directory else 0o666) & ~current_umask()


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (to persist a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path, fault: str | None = None) -> Iterator[Path]:
    """Yield a temporary path (same directory, same suffix) that replaces `target` on success."""
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.stem), suffix=target.suffix, dir=target.parent)
    try:
        os.fchmod(fd, default_mode())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if fault:
            fault_point(fault)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes, fault: str | None = None) -> None:
    with atomic_path(target, fault) as tmp:
        tmp.write_bytes(data)
