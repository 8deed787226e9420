"""Source images: checking, hashing, and preparing them for the pipeline.

Real-world inputs come in every shape: rotated phone photos (EXIF orientation), PNGs with
alpha, greyscale, palette, 16-bit and CMYK files, and any aspect ratio. `load_rgb` turns
each into 8-bit RGB the same way every time, and `prepare` fits it to the target size with
the configured resize policy. Everything that changes the pixels here is part of
`Preprocess`, which goes into each item's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from svdbatch.core.config import ImageCheck, ResizeMode
from svdbatch.core.jsonl import read_jsonl_fast
from svdbatch.core.locks import lock_or_go_on
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS, Preprocess

RESAMPLE = Image.Resampling.BICUBIC


class ImageProblem(ValueError):
    pass


def pixels_problem(size: tuple[int, int], max_pixels: int | None) -> str | None:
    width, height = size
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (
        f"image is {width}x{height} = {width * height:,} pixels, more than run.max_image_pixels "
        f"({max_pixels:,}); shrink it, or raise run.max_image_pixels if it is genuine"
    )


def open_image(path: str | os.PathLike | IO[bytes], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Image.open, refusing more than max_pixels from the header alone (a decompression
    bomb would otherwise fill memory while decoding)."""
    try:
        image = open_header(path)
    except Image.DecompressionBombError as exc:  # a plugin's own check (WebP, GIF frames)
        raise ImageProblem(f"refused by Pillow's limit in this process (PIL.Image.MAX_IMAGE_PIXELS): {exc}") from None
    why = pixels_problem(image.size, max_pixels)
    if why:
        image.close()
        raise ImageProblem(why)
    return image


SKIP_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)  # "not this format" (as Image.open)


def open_header(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Image.open without Pillow's process-wide decompression-bomb check (the global
    PIL.Image.MAX_IMAGE_PIXELS): its format plugins are asked directly, in Image.open's
    order. run.max_image_pixels is then checked per open (open_image) with our message, and
    a program that imports svdbatch keeps its own Pillow setting (setting the global, even
    for a moment, would change it for every thread of that program)."""
    is_path = isinstance(source, (str, os.PathLike))
    if is_path:
        with open(source, "rb") as handle:  # type: ignore[arg-type]
            prefix = handle.read(16)
    else:
        source.seek(0)  # type: ignore[union-attr]
        prefix = source.read(16)  # type: ignore[union-attr]
    tried: set[str] = set()
    for register in (Image.preinit, Image.init):  # the common plugins first, then all
        register()
        for name in [name for name in Image.ID if name not in tried]:
            tried.add(name)
            factory: Any  # a plugin class, or a function (JPEG: JPEG or MPO); typed for streams only
            factory, accept = Image.OPEN[name]
            try:
                verdict = accept(prefix) if accept else True
                if not verdict or isinstance(verdict, str):
                    continue
                if not is_path:
                    source.seek(0)  # type: ignore[union-attr]
                return factory(source)  # a path: the plugin opens (and on close, closes) it
            except SKIP_FORMAT:
                continue
    raise UnidentifiedImageError(f"cannot identify image file {source!r}")


LEVELS = {ImageCheck.none: 0, ImageCheck.header: 1, ImageCheck.full: 2}  # a deeper check vouches for a shallower one


def stat_problem(path: str | os.PathLike) -> str | None:
    if os.path.isdir(path):
        return "is a folder, not an image file"
    return None if os.path.isfile(path) else "image file not found"


def read_image(path: str | os.PathLike, level: ImageCheck, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Open the image as deep as `level` says (header: format and size, no pixel data; full:
    decode everything) and return its size; raise ImageProblem if it is not readable or has
    more than max_pixels."""
    try:
        with open_image(path, max_pixels) as image:
            if level is ImageCheck.full:
                image.load()  # a full decode catches truncated files, verify() alone does not
            return image.size
    except ImageProblem:
        raise
    except UnidentifiedImageError:  # PIL's own message repeats the absolute path
        what = "the file is empty" if os.path.getsize(path) == 0 else "not an image format Pillow can read"
        raise ImageProblem(f"not a readable image: {what}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"not a readable image: {exc}") from None


def check_image(
    path: str | os.PathLike, *, decode: bool | ImageCheck = True, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> None:
    """Raise ImageProblem if `path` is missing or, as deep as `decode` says (True: full,
    False: none, or an ImageCheck), too big or not a readable image."""
    level = decode if isinstance(decode, ImageCheck) else (ImageCheck.full if decode else ImageCheck.none)
    why = stat_problem(path)
    if why:
        raise ImageProblem(why)
    if level is not ImageCheck.none:
        read_image(path, level, max_pixels)


T = TypeVar("T")
R = TypeVar("R")


def parallel_map(function: Callable[[T], R], values: list[T], threads: int = 0) -> list[R]:
    """function over values on a few threads (decoding and hashing release the GIL), in
    chunks so that 100k cheap calls do not pay 100k futures; results in order."""
    threads = threads or min(8, 2 * (os.cpu_count() or 1))
    if len(values) < 2 or threads < 2:
        return [function(value) for value in values]
    size = max(1, min(256, len(values) // (4 * threads)))
    chunks = [values[start : start + size] for start in range(0, len(values), size)]
    with ThreadPoolExecutor(threads, thread_name_prefix="svdbatch-images") as pool:
        return [result for chunk in pool.map(lambda part: [function(v) for v in part], chunks) for result in chunk]


class ImageCache:
    """What was learnt about source images, kept in the run dir (cache/images.jsonl) by
    (path, size, mtime_ns): how deep the image was checked, its size and its sha256. A
    restart re-stats the files and reads no image bytes while they are unchanged (the rule
    make and rsync use). Problems are never cached: a bad file is looked at again.

    Several shards share a run dir: each appends only what it learnt, in one locked write;
    the latest line per path wins."""

    def __init__(self, path: Path | None):
        self.path = path  # None: remember within this process only
        self._known: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self._stats: dict[str, os.stat_result] = {}
        if path is not None and path.is_file():
            self._known = {r["path"]: r for r in read_jsonl_fast(path) if isinstance(r.get("path"), str)}

    def stat(self, path: str) -> os.stat_result:
        """os.stat, once per path and process (validation and planning both need it)."""
        found = self._stats.get(path)
        if found is None:
            found = self._stats[path] = os.stat(path)
        return found

    def facts(self, path: str, stat: os.stat_result) -> dict[str, Any]:
        """What is known about this very file (same size and mtime), else {}."""
        record = self._new.get(path) or self._known.get(path)
        if record and record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            return record
        return {}

    def learn(self, path: str, stat: os.stat_result, **facts: Any) -> None:
        record = dict(self.facts(path, stat))
        record.update(facts, path=path, bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
        self._new[path] = record

    def flush(self) -> None:
        """Append what this process learnt, in one write under the file's lock."""
        if self.path is None or not self._new:
            self._new.clear()
            return
        body = "".join(json.dumps(record, sort_keys=True) + "\n" for record in self._new.values()).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            lock_or_go_on(fd, str(self.path))  # a cache: a line two hosts interleave is skipped on read
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":  # a writer killed mid-line: start a fresh line
                body = b"\n" + body
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._known.update(self._new)
        self._new.clear()


def check_images(
    paths: Iterable[str],
    level: ImageCheck,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    cache: ImageCache | None = None,
) -> dict[str, str | None]:
    """The problem with each image (None: fine), checked as deep as `level`. Every file is
    stat'ed; its header or pixels are read only when the cache has not seen this very file
    checked as deep, and then on a few threads."""
    cache = cache or ImageCache(None)
    problems: dict[str, str | None] = {}
    to_read: list[tuple[str, os.stat_result]] = []
    for path in dict.fromkeys(paths):
        try:
            info = cache.stat(path)
        except OSError:
            problems[path] = "image file not found"
            continue
        if not S_ISREG(info.st_mode):
            problems[path] = stat_problem(path) or "not a regular file"
            continue
        known = cache.facts(path, info)
        if level is ImageCheck.none or LEVELS.get(ImageCheck(known.get("checked", "none")), 0) >= LEVELS[level]:
            size = known.get("size")
            problems[path] = pixels_problem(tuple(size), max_pixels) if size else None
            continue
        to_read.append((path, info))

    def read(entry: tuple[str, os.stat_result]) -> str | None:
        path, stat = entry
        try:
            size = read_image(path, level, max_pixels)
        except ImageProblem as exc:
            return str(exc)
        cache.learn(path, stat, checked=level.value, size=list(size))
        return None

    for (path, _), why in zip(to_read, parallel_map(read, to_read), strict=False):
        problems[path] = why
    return problems


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def load_rgb(
    path: str | os.PathLike,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open as 8-bit RGB, honouring EXIF orientation; alpha is composited onto `background`.
    More than max_pixels raises ImageProblem before decoding."""
    with open_image(path, max_pixels) as opened:
        image = ImageOps.exif_transpose(opened)  # a rotated copy, or a plain copy
        image.load()
    if has_alpha(image):
        rgba = image.convert("RGBA")
        composed = Image.new("RGB", rgba.size, background)
        composed.paste(rgba, mask=rgba.getchannel("A"))
        return composed
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        image = image.point(lambda v: v / 256).convert("L")
    elif image.mode == "F":
        image = image.point(lambda v: v * 255).convert("L")  # float images are taken as 0..1
    return image.convert("RGB")


def prepare(
    image: Image.Image,
    width: int,
    height: int,
    resize: ResizeMode = ResizeMode.stretch,
    pad_color: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Fit the RGB image to width x height with the given resize policy."""
    size = (width, height)
    resize = ResizeMode(resize)
    if image.size == size:
        return image
    if resize is ResizeMode.none:
        raise ImageProblem(f"image is {image.width}x{image.height} but conditioning.resize=none needs exactly {width}x{height}")
    if resize is ResizeMode.crop:
        return ImageOps.fit(image, size, method=RESAMPLE, centering=(0.5, 0.5))
    if resize is ResizeMode.pad:
        return ImageOps.pad(image, size, method=RESAMPLE, color=pad_color, centering=(0.5, 0.5))
    # stretch: what the diffusers guide does (`image.resize((1024, 576))`)
    return image.resize(size, RESAMPLE)


def pipeline_input(
    path: str | os.PathLike, preprocess: Preprocess, width: int, height: int
) -> tuple[Image.Image, tuple[int, int]]:
    """(the image the pipeline gets, the source's size): the source read as RGB and fitted to
    width x height as `preprocess` says. What a run does for every item and reproduce
    does for one, so both feed the pipeline the same pixels."""
    source = load_rgb(path, preprocess.background, preprocess.max_image_pixels)
    return prepare(source, width, height, preprocess.resize, preprocess.pad_color), source.size
