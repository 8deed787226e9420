"""`svdbatch score PATH...`: the quality signals (core/measure.py) of any video files or
folders, made by svdbatch or not, one JSON line per video, so an existing dataset can be
filtered the way a run judges its items (docs/quality.md).

A run dir is scored through its videos/ folder; a video of a run dir is measured against
its conditioning image (first_frame_psnr) as the run fitted it, found through its sidecar.
Other videos have no conditioning image: their first_frame_psnr is null. A file that is not
a readable video is reported (a line with "error") and the rest go on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from svdbatch.core.measure import measure
from svdbatch.core.quality import verdict
from svdbatch.inputs.images import pipeline_input
from svdbatch.rundir.layout import id_from_relpath, layout_version, sidecar_path_in
from svdbatch.rundir.outputs import read_video
from svdbatch.rundir.run_dirs import is_run_dir
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarError
from svdbatch.rundir.store import GALLERY_ASSETS_DIR, VIDEOS_DIR

# What a folder walk takes for a video (by suffix); a folder of PNG frames counts as one.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".webp"})
# Run-dir folders that hold no dataset videos (the gallery's previews are .webp files).
SKIPPED_DIRS = frozenset({GALLERY_ASSETS_DIR, "webdataset", "downloads", "replaced", "claims", "cache", "items"})


@dataclass
class Scored:
    """One video's signals (or why it could not be scored)."""

    path: str
    signals: dict[str, Any] | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    source: str | None = None  # the conditioning image first_frame_psnr compares with
    verdict: list[str] = field(default_factory=list)  # the rules broken (with rules given)
    error: str | None = None

    @property
    def dud(self) -> bool:
        return bool(self.verdict)

    def as_dict(self, judged: bool) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out = {
            "path": self.path,
            "frames": self.frames,
            "width": self.width,
            "height": self.height,
            "source": self.source,
            **(self.signals or {}),
        }
        if judged:
            out.update({"dud": self.dud, "verdict": self.verdict})
        return out


def is_frames_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.png")) and not any(p.is_dir() for p in path.iterdir())


def video_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """The videos named by `paths`, in order: files as given (whatever their suffix: a bad
    one is reported, not skipped), folders walked (sorted; a run dir through its videos/)."""
    for given in paths:
        path = Path(given)
        if not path.is_dir() or is_frames_folder(path):
            yield path
            continue
        if is_run_dir(path) and (path / VIDEOS_DIR).is_dir():
            path = path / VIDEOS_DIR
        yield from _walk(path)


def _walk(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_frames_folder(entry):
                yield entry
            elif entry.name not in SKIPPED_DIRS:
                yield from _walk(entry)
        elif entry.suffix.lower() in VIDEO_SUFFIXES:
            yield entry


def decode(path: Path) -> np.ndarray:
    """uint8 frames (F, H, W, 3) of a video file or PNG frames folder."""
    if path.is_dir() or path.suffix.lower() in (".gif", ".webp", ".mp4"):
        frames = read_video(path)
    else:
        import imageio.v3 as iio  # any other container ffmpeg reads

        frames = np.asarray(iio.imread(path, plugin="FFMPEG"))
    if frames.ndim == 3:  # one frame
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"no frames decoded (shape {frames.shape})")
    if frames.shape[-1] == 4:
        frames = frames[..., :3]
    return np.ascontiguousarray(frames.astype(np.uint8, copy=False))


def conditioning_image(path: Path, width: int, height: int) -> tuple[Any, str | None]:
    """(the conditioning image as the run fitted it, its path) for a video inside a run dir's
    videos/ whose sidecar names a still readable source; (None, None) otherwise."""
    path = path.resolve()
    for parent in path.parents:
        if parent.name != VIDEOS_DIR or not is_run_dir(parent.parent):
            continue
        relative = path.relative_to(parent)
        run_dir = parent.parent
        stem = relative.with_suffix("").as_posix() if path.is_file() else relative.as_posix()
        item_id = id_from_relpath(stem, layout_version(run_dir))  # videos/<bucket>/<id>.mp4 or videos/<id>.mp4
        try:
            sidecar = Sidecar.read(sidecar_path_in(run_dir, item_id))
            image, _ = pipeline_input(sidecar.image.path, sidecar.preprocessing(None), width, height)
        except (OSError, SidecarError, ValueError, KeyError, TypeError):
            return None, None
        return image, sidecar.image.path
    return None, None


def score_video(path: Path, quality: Any = None) -> Scored:
    """Decode and measure one video; never raises for a bad file (Scored.error says why)."""
    try:
        frames = decode(path)
    except Exception as exc:  # any decoder error: this file is reported, the rest go on
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Scored(str(path), error=f"not a readable video: {message}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    source, source_path = conditioning_image(path, width, height)
    signals = measure(frames, source).as_dict()
    return Scored(str(path), signals, int(frames.shape[0]), width, height, source_path, verdict(signals, quality))


def score_paths(paths: Iterable[str | os.PathLike], quality: Any = None) -> Iterator[Scored]:
    """Scored videos of every path (video_paths), one at a time."""
    for path in video_paths(paths):
        if not path.exists():
            yield Scored(str(path), error="no such file or folder")
            continue
        yield score_video(path, quality)
