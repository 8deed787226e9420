"""Frames -> files: mp4 (H.264, libx264 + yuv420p, by imageio-ffmpeg's ffmpeg), gif, webp, PNG frames.

Every writer writes into a temporary name next to the target, fsyncs, then renames
(atomic.py), so a killed run leaves either the old file, the new file, or a stray temporary, never a torn
file under the real name. Before the rename the temporary is decoded once and must give
the expected frame count and size (PNG frames: the very frames), and the encoder's exit
status is checked: a file that does not decode never gets its real name.

What shaped a file (format, written fps, quality, loop, encoder) is summed up by
`output_settings`; its hash, the output key, is part of what "done" means (store.py), so
changing an output setting redoes the items instead of leaving videos the config does not describe.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from svdbatch.core.atomic import DISK_FULL_ERRNOS, atomic_path, default_mode, fsync_path, temp_prefix
from svdbatch.core.config import OutputConfig, OutputFormat
from svdbatch.core.faults import fault_point

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # numpy is imported where frames are handled: `svdbatch status` needs none
    import numpy as np

# Bump when the bytes written for the same settings change on purpose (encoder flags, ...):
# it is part of the output key, so it redoes the items.
OUTPUT_VERSION = 1
# Pinned, never auto-detected: imageio-ffmpeg's probe for "the best H.264 encoder" can fail
# (e.g. when Ctrl-C reaches it) and silently fall back to another encoder with other pixels.
MP4_CODEC, MP4_PIX_FMT = "libx264", "yuv420p"


def output_name(item_id: str, fmt: OutputFormat) -> str:
    fmt = OutputFormat(fmt)
    return item_id if fmt is OutputFormat.frames else f"{item_id}.{fmt.value}"


def _write_frames_dir(frames: np.ndarray, target: Path, settings: dict[str, Any]) -> Written:
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    try:
        os.chmod(staging, default_mode(directory=True))
        for index, frame in enumerate(frames):
            frame_path = staging / f"{index:05d}.png"
            Image.fromarray(frame).save(frame_path)
            fsync_path(frame_path)
        fault_point("encode")
        count, height, width = (int(n) for n in frames.shape[:3])
        check_decodes(staging, count, height, width, frames_sha256(frames))
        written = Written(output_bytes(staging), output_sha256(staging), encoder_record(settings))
        fault_point("video")
        if target.exists():
            shutil.rmtree(target)  # the sidecar, written last, is what marks an item done
        os.rename(staging, target)
        fsync_path(target.parent)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class EncoderError(RuntimeError):
    """The encoder reported an error (non-zero exit status): the item fails."""


class OutputCheckError(RuntimeError):
    """A written file does not decode to the frames it was given: the item fails."""


@dataclass(frozen=True)
class Written:
    """What the sidecar records about a written output."""

    bytes: int
    sha256: str
    encoder: dict[str, Any]


def mp4_crf(quality: float) -> int:
    """imageio-ffmpeg's mapping of quality 0..10 to libx264's crf 51..0 (kept, so files stay as before)."""
    return int((1 - quality / 10.0) * 51)


def written_fps(output: OutputConfig, item_fps: int) -> int:
    """The frame rate a file is written at: output.fps, else the item's conditioning fps."""
    return output.fps or item_fps


def output_settings(output: OutputConfig, fps: int) -> dict[str, Any]:
    """Everything that shapes the bytes of an item's output file, and nothing else (the
    loop count does not touch an mp4, no setting but the format touches PNG frames)."""
    fmt = OutputFormat(output.format)
    settings: dict[str, Any] = {"version": OUTPUT_VERSION, "format": fmt.value}
    if fmt is OutputFormat.frames:
        return settings
    settings["fps"] = int(fps)
    if fmt is OutputFormat.mp4:
        settings.update(codec=MP4_CODEC, pix_fmt=MP4_PIX_FMT, crf=mp4_crf(output.quality))
    elif fmt is OutputFormat.webp:
        settings.update(quality=int(output.quality * 10), loop=int(output.loop))
    else:
        settings["loop"] = int(output.loop)
    return settings


def frames_sha256(frames: np.ndarray) -> str:
    """The hash of generated uint8 frames recorded in every sidecar (shape included)."""
    import numpy as np

    digest = hashlib.sha256(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def output_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def output_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a folder of frames, of its files' names and hashes."""
    path = Path(path)
    if not path.is_dir():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for entry in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{entry.name}\0{_file_sha256(entry)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=1)
def ffmpeg_version() -> str:
    import imageio_ffmpeg  # runs `ffmpeg -version`: once per process

    return imageio_ffmpeg.get_ffmpeg_version()


def encoder_error(returncode: int, stderr: bytes, target: Path) -> Exception:
    """The exception for a failed ffmpeg: a disk-full OSError when ffmpeg says so (the run
    must stop, not fail every item after it), else EncoderError with ffmpeg's own words."""
    text = stderr.decode(errors="replace").strip()
    # ffmpeg's last line, without its "[out#0/mp4 @ 0x55d2...] " prefix.
    tail = re.sub(r"^\[[^]]*\] ", "", text.splitlines()[-1]) if text else "no message"
    for number in sorted(DISK_FULL_ERRNOS):
        if os.strerror(number) in text:
            return OSError(number, f"{os.strerror(number)} (ffmpeg writing {target.name}: {tail})")
    return EncoderError(f"ffmpeg exited with status {returncode} writing {target.name}: {tail}")


def encode_mp4(frames: np.ndarray, target: Path, fps: int, settings: dict[str, Any]) -> None:
    """H.264 with exactly imageio-ffmpeg's command line for libx264 (what diffusers'
    export_to_video ran), but with the codec named, stderr kept and the exit status checked:
    imageio-ffmpeg's writer ignores ffmpeg's exit status, so a full disk gave a "done" file."""
    import numpy as np

    _, height, width, _ = frames.shape
    cmd = [
        ffmpeg_exe(),
        "-y",
        "-f",
        "rawvideo",
        "-vcodec",
        "rawvideo",
        "-s",
        f"{width}x{height}",
        "-pix_fmt",
        "rgb24",
        "-r",
        str(fps),
        "-i",
        "-",
        "-an",
        "-vcodec",
        settings["codec"],
        "-pix_fmt",
        settings["pix_fmt"],
        "-crf",
        str(settings["crf"]),
        "-v",
        "warning",
        "-f",
        "mp4",
        str(target),
    ]
    # Sizes are multiples of 8 (validated) and yuv420p needs even ones: no scaling, unlike
    # imageio's default macro block of 16, which rescaled e.g. 72 px to 80.
    done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if done.returncode != 0:
        raise encoder_error(done.returncode, done.stderr, target)


def encoder_record(settings: dict[str, Any]) -> dict[str, Any]:
    """What wrote the file, for the sidecar."""
    fmt = OutputFormat(settings["format"])
    if fmt is OutputFormat.mp4:
        return {"name": settings["codec"], "pix_fmt": settings["pix_fmt"], "crf": settings["crf"], "ffmpeg": ffmpeg_version()}
    import PIL

    return {"name": f"pillow-{'png' if fmt is OutputFormat.frames else fmt.value}", "pillow": PIL.__version__}


def check_decodes(
    path: Path, frames: int, height: int, width: int, frames_sha: str | None = None, fps: float | None = None
) -> None:
    """Decode a written output once: it must give `frames` frames of width x height (and,
    when given, for lossless PNG frames, exactly the frames with that hash)."""
    try:
        decoded = read_video(path)
        count = len(decoded)
        if fps and path.suffix in (".gif", ".webp"):
            count = shown_frames(path, fps)
    except Exception as exc:  # any decoder error: the file is not what it should be
        log.debug("decoding %s failed:\n%s", path, exc)  # the decoder's whole output, for the log only
        raise OutputCheckError(f"{path.name} does not decode: {type(exc).__name__}: {decoder_reason(str(exc))}") from None
    if decoded.ndim != 4 or count != frames or tuple(decoded.shape[1:3]) != (height, width):
        size = f"{decoded.shape[2]}x{decoded.shape[1]}" if decoded.ndim == 4 else "x".join(map(str, decoded.shape))
        raise OutputCheckError(f"{path.name} decodes to {count} frames of {size}, expected {frames} frames of {width}x{height}")
    if frames_sha is not None and frames_sha256(decoded) != frames_sha:
        raise OutputCheckError(f"{path.name}: the decoded frames differ from the generated ones")


# What ffmpeg prints before it says what is wrong: its version, build and library lines.
_FFMPEG_BANNER = re.compile(r"^\s*(ffmpeg version|built with|configuration:|lib\w+\s+\d|Input #|Duration:|Stream #|Metadata:)")


def decoder_reason(text: str) -> str:
    """One line that says why a file did not decode: a decoder's message (imageio-ffmpeg
    quotes ffmpeg's whole banner and configuration) without the banner, its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not _FFMPEG_BANNER.match(line)]
    reason = lines[-1] if lines else text.strip()
    return reason[:200]


def shown_frames(path: Path, fps: float) -> int:
    """Frames an animated GIF/WebP shows: Pillow merges identical consecutive frames into
    one that lasts longer, so count by duration (at least one per stored frame)."""
    nominal = 1000 / fps
    total = 0
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            image.load()  # WebP reports a frame's duration once it is decoded
            total += max(1, round(image.info.get("duration", nominal) / nominal))
    return total


def write_video(frames: np.ndarray, target: Path, output: OutputConfig, fps: int) -> Written:
    """Write uint8 frames (F, H, W, 3) to `target` in the configured format, check that it
    decodes to those frames, then rename it into place. Raises EncoderError or
    OutputCheckError (the item fails) or OSError (a full disk stops the run)."""
    settings = output_settings(output, fps)
    fmt = OutputFormat(settings["format"])
    # Not its parents: a run dir deleted mid-run must stop the run, not come back as a husk.
    target.parent.mkdir(exist_ok=True)
    count, height, width = (int(n) for n in frames.shape[:3])
    if fmt is OutputFormat.frames:
        return _write_frames_dir(frames, target, settings)
    with atomic_path(target, fault="video") as tmp:
        if fmt is OutputFormat.mp4:
            encode_mp4(frames, tmp, fps, settings)
        else:
            pil_frames = [Image.fromarray(frame) for frame in frames]
            # PIL's GIF/WebP writers take a per-frame duration in milliseconds.
            extra = {"optimize": False} if fmt is OutputFormat.gif else {"quality": settings["quality"], "lossless": False}
            pil_frames[0].save(
                tmp,
                format=fmt.value.upper(),
                save_all=True,
                append_images=pil_frames[1:],
                duration=round(1000 / fps),
                loop=settings["loop"],
                **extra,
            )
        fault_point("encode")
        check_decodes(tmp, count, height, width, fps=fps)
        written = Written(output_bytes(tmp), output_sha256(tmp), encoder_record(settings))
    return written


def place_output(staged: Path, target: Path) -> None:
    """Rename a written and checked output (write_video to a temporary name) into place,
    replacing what is there (a folder of PNG frames cannot be renamed over a folder)."""
    if staged.is_dir() and target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # the sidecar, written last, is what marks an item done
    os.replace(staged, target)
    fsync_path(target.parent)


def remove_output(path: Path) -> None:
    """Delete an output file or frames folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def link_output(source: Path, target: Path) -> str:
    """Make `target` the very output `source` is (a file, or a folder of frames): hard links
    when both are on one file system, else a copy; atomic like every writer here. Returns
    'link' or 'copy'. Safe to share inodes: outputs are only ever replaced, never edited."""
    target.parent.mkdir(exist_ok=True)  # as in write_video
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


def output_bytes(path: str | os.PathLike[str]) -> int:
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
    import numpy as np

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
