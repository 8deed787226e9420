"""Frames -> files: mp4 (H.264 via diffusers' export_to_video / imageio-ffmpeg), gif, webp, PNG frames.

Every writer writes into a temporary name next to the target, fsyncs, then renames, so a
killed run leaves either the old file, the new file, or a stray temporary, never a torn
file under the real name.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from .config import OutputConfig, OutputFormat
from .faults import fault_point

TEMP_MARKER = ".partial-"
_HOST = socket.gethostname().replace("@", "_")[:64]


def temp_prefix(stem: str) -> str:
    """'.<stem>.partial-<pid>@<host>@': who wrote a temporary, so a later run can delete
    the leftovers of a dead process at once (and leave a live one's alone). The stem is
    only a hint for humans: cut to 60 bytes so a 200-byte id stays under NAME_MAX (255)."""
    short = stem.encode()[:60].decode(errors="ignore")
    return f".{short}{TEMP_MARKER}{os.getpid()}@{_HOST}@"


def temp_owner(name: str) -> Optional[tuple[int, str]]:
    """(pid, host) of a temporary's writer, or None if `name` is not one of ours."""
    at = name.rfind(TEMP_MARKER)
    if at < 0:
        return None
    pid, _, rest = name[at + len(TEMP_MARKER):].partition("@")
    host, found, _ = rest.partition("@")
    return (int(pid), host) if pid.isdigit() and found else None


def written_by_dead_process(name: str) -> bool:
    owner = temp_owner(name)
    if owner is None or owner[1] != _HOST:
        return False  # another machine's process (shared file system): cannot tell
    try:
        os.kill(owner[0], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def output_name(item_id: str, fmt: OutputFormat) -> str:
    fmt = OutputFormat(fmt)
    return item_id if fmt is OutputFormat.frames else f"{item_id}.{fmt.value}"


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (to persist a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path, fault: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path (same directory, same suffix) that replaces `target` on success."""
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.stem), suffix=target.suffix, dir=target.parent)
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


def atomic_write_bytes(target: Path, data: bytes, fault: Optional[str] = None) -> None:
    with atomic_path(target, fault) as tmp:
        tmp.write_bytes(data)


def _write_frames_dir(frames: np.ndarray, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    try:
        for index, frame in enumerate(frames):
            frame_path = staging / f"{index:05d}.png"
            Image.fromarray(frame).save(frame_path)
            fsync_path(frame_path)
        fault_point("video")
        if target.exists():
            shutil.rmtree(target)  # the sidecar, written last, is what marks an item done
        os.rename(staging, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_video(frames: np.ndarray, target: Path, output: OutputConfig, fps: int) -> None:
    """Write uint8 frames (F, H, W, 3) to `target` in the configured format."""
    fmt = OutputFormat(output.format)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt is OutputFormat.frames:
        _write_frames_dir(frames, target)
        return
    pil_frames = [Image.fromarray(frame) for frame in frames]
    with atomic_path(target, fault="video") as tmp:
        if fmt is OutputFormat.mp4:
            from diffusers.utils import export_to_video

            # libx264 + yuv420p (imageio's defaults: plays in browsers). Sizes are multiples
            # of 8 (validated); the default macro block of 16 would make ffmpeg rescale e.g. 72 px to 80.
            export_to_video(pil_frames, str(tmp), fps=fps, quality=output.quality, macro_block_size=8)
        else:
            # PIL's GIF/WebP writers take a per-frame duration in milliseconds.
            extra = {"optimize": False} if fmt is OutputFormat.gif else {"quality": int(output.quality * 10), "lossless": False}
            pil_frames[0].save(
                tmp,
                format=fmt.value.upper(),
                save_all=True,
                append_images=pil_frames[1:],
                duration=round(1000 / fps),
                loop=output.loop,
                **extra,
            )


def link_output(source: Path, target: Path) -> str:
    """Make `target` the very output `source` is (a file, or a folder of frames): hard links
    when both are on one file system, else a copy; atomic like every writer here. Returns
    'link' or 'copy'. Safe to share inodes: outputs are only ever replaced, never edited."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
        try:
            hows = {_link_or_copy(frame, staging / frame.name) for frame in sorted(source.iterdir()) if frame.is_file()}
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
            fsync_path(target.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return "copy" if "copy" in hows else "link"
    with atomic_path(target) as tmp:
        tmp.unlink()
        how = _link_or_copy(source, tmp)
    return how


def _link_or_copy(source: Path, target: Path) -> str:
    try:
        os.link(source, target)
        return "link"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copy2(source, target)
    return "copy"


def output_bytes(path: str | os.PathLike) -> int:
    """Size of a written output (file, or folder of frames); -1 if it is missing."""
    try:
        info = os.stat(path)
    except OSError:
        return -1
    if stat.S_ISDIR(info.st_mode):
        return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
    return info.st_size


def read_video(path: Path) -> np.ndarray:
    """Decode a written output back to uint8 frames (F, H, W, 3)."""
    if path.is_dir():
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.glob("*.png"))])
    import imageio.v3 as iio

    if path.suffix == ".mp4":
        return np.asarray(iio.imread(path, plugin="FFMPEG"))
    with Image.open(path) as image:
        frames = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
    return np.stack(frames)
