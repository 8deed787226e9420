"""Item ids and seeds: the id a row gets (given, or derived from the image path), what makes
one unsafe as a file name, when two ids name the same file, and the seed derived from the id."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from svdbatch.inputs.fetch import is_url

# In UTF-8 bytes, not characters: ids become file names, and file systems limit names to
# 255 bytes (the temporary names add a few dozen more).
MAX_ID_BYTES = 200
# Path separators, characters Windows/SMB shares reject, and control characters (C0, DEL, C1).
UNSAFE_ID_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f-\x9f]')
# Windows reserves these names with any extension, in any case ('nul.txt', 'Com1'): such a
# file cannot be created or copied there. Microsoft's list includes COM0/LPT0 and the
# superscript digits.
WINDOWS_DEVICE_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{port}{digit}" for port in ("com", "lpt") for digit in "0123456789¹²³"]
)
# Lone UTF-16 surrogates: JSON's "\ud800" parses to one, and no file system, UTF-8 encoder or
# JSON writer of another language accepts it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def derive_seed(run_seed: int, item_id: str) -> int:
    """A stable per-item seed from the run seed and the item id (never from a global RNG)."""
    digest = hashlib.sha256(f"svdbatch-seed:{run_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def derive_id(image_ref: str) -> str:
    """An id from the image path: 'a/b/cat.png' -> 'a__b__cat', 'https://host/x/cat.jpg' -> 'host__x__cat'."""
    if is_url(image_ref):
        split = urlsplit(image_ref)
        image_ref = f"{(split.hostname or '')}/{unquote(split.path)}"
    parts = [p for p in PurePosixPath(image_ref.replace("\\", "/")).with_suffix("").parts if p not in ("", ".", "..", "/")]
    return "__".join(parts)


def id_problem(item_id: str) -> str | None:
    """Ids become file names inside the run dir, so they must not be able to escape it, and
    the run dir must survive being copied to Windows or macOS."""
    if not item_id:
        return "must not be empty"
    if LONE_SURROGATE.search(item_id):
        return f"is not valid Unicode text (a lone surrogate, as JSON's \\ud800 gives): {item_id!r}"
    size = len(item_id.encode())
    if size > MAX_ID_BYTES:
        return f"must be at most {MAX_ID_BYTES} bytes in UTF-8 (it names files), got {size}"
    if item_id.startswith("."):
        return f"must not start with '.' (got {item_id!r})"
    if UNSAFE_ID_CHARS.search(item_id):
        return f"must not contain path separators, control or reserved characters (got {item_id!r})"
    if item_id.endswith((".", " ")):
        return f"must not end with '.' or a space: Windows drops them from file names (got {item_id!r})"
    if item_id.split(".")[0].rstrip(" ").lower() in WINDOWS_DEVICE_NAMES:
        return f"is a reserved device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any extension): {item_id!r}"
    return None


def id_fold(item_id: str) -> str:
    """What an id names on a case-insensitive, normalisation-insensitive file system (macOS,
    Windows): 'Case'/'case' and NFC/NFD 'café' are one file there."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", item_id).casefold())


def unique_id(item_id: str, image_ref: str, taken: Mapping[str, Any]) -> str:
    """An id for a row whose derived id is `taken` (by id_fold) already: the id with the
    image's extension ('a' from a.png -> 'a.png'), else with a number ('a-2', 'a-3', ...)."""
    suffix = PurePosixPath(image_ref.replace("\\", "/")).suffix
    candidates = [f"{item_id}{suffix}"] if suffix else []
    number = 2
    while True:
        for candidate in candidates:
            if id_problem(candidate) is None and id_fold(candidate) not in taken:
                return candidate
        candidates = [f"{item_id}-{number}"]
        number += 1


def row_id(row: Mapping[str, Any]) -> str:
    """The id a row will have (as RowValidator gives it), told cheaply before the row is
    validated, to pick its shard; '' when none can be told."""
    raw_id = row.get("id")
    if raw_id is not None:
        return str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
    image_ref = row.get("image")
    if not isinstance(image_ref, str) or not image_ref.strip() or "\x00" in image_ref or LONE_SURROGATE.search(image_ref):
        return ""
    return derive_id(image_ref.strip())
