"""Source images: checking, hashing, and preparing them for the pipeline.

Real-world inputs come in every shape: rotated phone photos (EXIF orientation), PNGs with
alpha, greyscale, palette, 16-bit and CMYK files, and any aspect ratio. `load_rgb` turns
each into 8-bit RGB the same way every time, and `prepare` fits it to the target size with
the configured resize policy. Everything that changes the pixels here is part of
`Preprocess`, which goes into each item's key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from .config import ResizeMode

# Bump when load_rgb/prepare change how they turn the same bytes into pixels.
PREPROCESS_VERSION = 1
RESAMPLE = Image.Resampling.BICUBIC
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # run.max_image_pixels

# Every open below checks run.max_image_pixels from the header, before decoding. PIL's own
# process-wide check would otherwise warn, or fail with its own limit and message, before
# ours (and would refuse images a user allowed by raising run.max_image_pixels).
Image.MAX_IMAGE_PIXELS = None


class ImageProblem(ValueError):
    pass


def parse_color(text: str) -> tuple[int, int, int]:
    """'black', '#202020', 'rgb(0,128,255)' -> an RGB tuple (PIL's colour names and syntax)."""
    try:
        return ImageColor.getrgb(str(text).strip())[:3]
    except ValueError:
        raise ValueError(f"not a colour: {text!r} (use a name like 'black', '#rrggbb' or 'rgb(r,g,b)')") from None


@dataclass(frozen=True)
class Preprocess:
    """How a source image becomes the pipeline's input; part of every item's key."""

    resize: ResizeMode = ResizeMode.crop
    pad_color: tuple[int, int, int] = (0, 0, 0)
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited onto this
    # run.max_image_pixels: refuses an image, never changes its pixels, so it is neither in
    # as_dict (the key) nor compared.
    max_image_pixels: Optional[int] = field(default=DEFAULT_MAX_IMAGE_PIXELS, compare=False)

    @classmethod
    def from_config(cls, cond: Any, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> "Preprocess":
        return cls(
            resize=ResizeMode(cond.resize),
            pad_color=parse_color(cond.pad_color),
            background=parse_color(cond.background),
            max_image_pixels=max_image_pixels,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": PREPROCESS_VERSION,
            "resize": self.resize.value,
            "pad_color": list(self.pad_color),
            "background": list(self.background),
        }


def pixels_problem(size: tuple[int, int], max_pixels: Optional[int]) -> Optional[str]:
    width, height = size
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (
        f"image is {width}x{height} = {width * height:,} pixels, more than run.max_image_pixels "
        f"({max_pixels:,}); shrink it, or raise run.max_image_pixels if it is genuine"
    )


def open_image(path: str | os.PathLike, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Image.open, refusing more than max_pixels from the header alone (a decompression
    bomb would otherwise fill memory while decoding)."""
    image = Image.open(path)
    why = pixels_problem(image.size, max_pixels)
    if why:
        image.close()
        raise ImageProblem(why)
    return image


def check_image(path: str | os.PathLike, *, decode: bool = True, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise ImageProblem if `path` is missing or (with decode) is too big or not a readable image."""
    if not os.path.isfile(path):  # the only check on the fast path: one stat
        raise ImageProblem("is a folder, not an image file" if os.path.isdir(path) else "image file not found")
    if not decode:
        return
    try:
        with open_image(path, max_pixels) as image:
            image.load()  # a full decode catches truncated files, verify() alone does not
    except ImageProblem:
        raise
    except UnidentifiedImageError:  # PIL's own message repeats the absolute path
        what = "the file is empty" if os.path.getsize(path) == 0 else "not an image format Pillow can read"
        raise ImageProblem(f"not a readable image: {what}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"not a readable image: {exc}") from None


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
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
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


def prepare(image: Image.Image, width: int, height: int, resize: ResizeMode = ResizeMode.stretch,
            pad_color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Fit the RGB image to width x height with the given resize policy."""
    size = (width, height)
    resize = ResizeMode(resize)
    if image.size == size:
        return image
    if resize is ResizeMode.none:
        raise ImageProblem(
            f"image is {image.width}x{image.height} but conditioning.resize=none needs exactly {width}x{height}"
        )
    if resize is ResizeMode.crop:
        return ImageOps.fit(image, size, method=RESAMPLE, centering=(0.5, 0.5))
    if resize is ResizeMode.pad:
        return ImageOps.pad(image, size, method=RESAMPLE, color=pad_color, centering=(0.5, 0.5))
    # stretch: what the diffusers guide does (`image.resize((1024, 576))`)
    return image.resize(size, RESAMPLE)
