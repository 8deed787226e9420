"""Source images: checking, hashing and preparing them for the pipeline."""

from __future__ import annotations

import hashlib
import os

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageProblem(ValueError):
    pass


def check_image(path: str | os.PathLike, *, decode: bool = True) -> None:
    """Raise ImageProblem if `path` is missing or (with decode) is not a readable image."""
    if not os.path.isfile(path):
        raise ImageProblem("image file not found")
    if not decode:
        return
    try:
        with Image.open(path) as image:
            image.load()  # a full decode catches truncated files, verify() alone does not
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"not a readable image: {exc}") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open as 8-bit RGB, honouring EXIF orientation; alpha is composited onto white."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def prepare(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to the target size as the diffusers guide does (`image.resize((1024, 576))`)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)
