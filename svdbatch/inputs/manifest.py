"""Manifest files (CSV or JSONL) or a folder of images -> validated items.

Everything is checked before any model loads, and every problem is reported at once as
``file:line: field 'x': what is wrong``. File-level problems (unreadable file, unknown
columns, no rows) are always fatal; row-level problems are fatal in strict mode and
otherwise skip just that row (the driver records it in the failure records).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.config import ImageCheck, ResizeMode, image_check_mode
from svdbatch.core.errors import ConfigError, ManifestError
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS, PARAM_NAMES, ValueProblem, coerce, combination_problems, show_value
from svdbatch.inputs.fetch import is_url, url_problem
from svdbatch.inputs.images import ImageCache, ImageProblem, check_image
from svdbatch.inputs.images import check_images as check_image_files
from svdbatch.rundir.store import OUTPUTS_ROOT, is_run_dir

log = logging.getLogger(__name__)

SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1
META_PREFIX = "meta_"  # free-form columns carried into the sidecar untouched
CORE_COLUMNS = ("id", "image", "seed", "resize")  # resize: per-row conditioning.resize
KNOWN_COLUMNS = frozenset(CORE_COLUMNS + PARAM_NAMES)
RESIZE_MODES = tuple(mode.value for mode in ResizeMode)
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
# Python's csv module refuses fields over 128 KiB by default; a long caption in a meta_*
# column is legitimate, so the limit is raised to this (characters).
CSV_FIELD_LIMIT = 16 * 2**20
SEED_TEXT = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take '1_0' or '٣'
# Files a folder manifest picks up (hidden files and folders are skipped).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(slots=True)
class Item:
    """One validated manifest row; read-only by convention. Slots and not frozen: a 1M-row
    manifest makes a million of them, and a frozen dataclass is built 5x slower (every field
    set through object.__setattr__). It was never hashable (its dicts are not)."""

    id: str
    image: str | None  # absolute, normalised path (a str: cheap for 100k rows); None for a URL
    image_ref: str  # the image as written in the manifest (a path or an http(s) URL)
    seed: int
    seed_derived: bool
    overrides: dict[str, Any]  # per-row conditioning overrides, already typed
    meta: dict[str, Any]
    manifest: str
    line: int
    # Per-row conditioning.resize (how the image is fitted, not a pipeline argument); None = the config's.
    resize: str | None = None

    @property
    def url(self) -> str | None:
        return self.image_ref if is_url(self.image_ref) else None

    def row_record(self) -> dict[str, Any]:
        """The row as the sidecar records it."""
        return {
            "manifest": self.manifest,
            "line": self.line,
            "id": self.id,
            "image": self.image_ref,
            "seed": self.seed,
            "seed_derived": self.seed_derived,
            "overrides": dict(self.overrides),
            "resize": self.resize,
            "meta": dict(self.meta),
        }


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str | None
    message: str
    item_id: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field '{printable(self.field)}': " if self.field else ""
        return f"{where}: {what}{self.message}"


def printable(text: str) -> str:
    """Text safe to print or log: a lone surrogate (from a JSONL key) as a \\ud800 escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Manifest:
    path: Path
    items: list[Item] = field(default_factory=list)
    # Rows that failed validation (only non-empty when not strict): (line, id or None, problems).
    bad_rows: list[tuple[int, str | None, list[Problem]]] = field(default_factory=list)
    # Rows whose derived id collided with an earlier one's and was made unique (unique_ids=True):
    # (line, image as written, the new id).
    renamed: list[tuple[int, str, str]] = field(default_factory=list)
    # Rows left to other shards (read_manifest's `shard`): read, not validated.
    other_rows: int = 0
    # Whether the rows came from the parse cache (the file and settings unchanged since).
    cached: bool = False


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


def row_value_problems(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, why) for values no output could hold: lone surrogates in any column name or
    text value (id and image are checked where they are parsed), and NaN or infinite numbers
    in meta_* data (the sidecar and metadata.jsonl must stay valid JSON)."""
    found = []
    for key, value in row.items():
        if LONE_SURROGATE.search(key):
            found.append((key, "column name is not valid Unicode text (a lone surrogate, as JSON's \\ud800 gives)"))
        elif key not in ("id", "image"):
            why = _bad_value(value, key.startswith(META_PREFIX))
            if why:
                found.append((key, why))
    return found


def _bad_value(value: Any, is_meta: bool) -> str | None:
    if isinstance(value, str):
        return "is not valid Unicode text (a lone surrogate, as JSON's \\ud800 gives)" if LONE_SURROGATE.search(value) else None
    if isinstance(value, float) and not math.isfinite(value) and is_meta:
        return f"must be a finite number or text, got {value} (JSON has no NaN or Infinity)"
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((why for why in (_bad_value(v, is_meta) for v in value) if why), None)
    return None


def _coerce_seed(value: Any) -> int:
    # No floats, not even 42.0: a float seed above 2**53 has already lost digits.
    if isinstance(value, bool):
        raise ValueProblem(f"must be an integer in [0, 2**64), got {show_value(value)}")
    if isinstance(value, str):
        text = value.strip()
        if not SEED_TEXT.fullmatch(text):
            raise ValueProblem(f"must be an integer in [0, 2**64), got {show_value(value)}")
        value = int(text)
    if not isinstance(value, int):
        raise ValueProblem(f"must be an integer in [0, 2**64), got {show_value(value)}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueProblem(f"must be an integer in [0, 2**64), got {value}")
    return value


Row = tuple[int, dict[str, Any], list[Problem]]  # line, values, problems found while reading


def _csv_rows(reader: Any, shown: str, problems: list[Problem], path: Path | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of each non-blank record. Broken quoting ends the file with a fatal
    problem naming the line the record started on (strict mode: otherwise an unclosed
    quote silently swallows the rest of the file into one cell)."""
    while True:
        start = reader.line_num + 1
        try:
            with csv_field_limit(CSV_FIELD_LIMIT):
                values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                why = (
                    f"a field is larger than {CSV_FIELD_LIMIT:,} characters, the most svdbatch reads from one CSV cell "
                    "(a quote that is never closed swallows the rest of the file the same way)"
                )
                problems.append(Problem(shown, start, _oversized_column(path, start) if path else None, why))
            else:
                problems.append(Problem(shown, start, None, f"not valid CSV from this line on ({exc}); check the quotes"))
            return
        if any(v.strip() for v in values):
            yield reader.line_num, values


def _oversized_column(path: Path, start: int) -> str | None:
    """The header name of the column whose cell overflowed, read again without the limit;
    None when it cannot be told (the header itself, or other broken quoting)."""
    try:
        with csv_field_limit(sys.maxsize), open(path, newline="", encoding="utf-8-sig") as handle:
            again = csv.reader(handle, strict=True)
            header = None
            while True:
                line = again.line_num + 1
                values = next(again)
                if line == start:
                    index = next((i for i, v in enumerate(values) if len(v) > CSV_FIELD_LIMIT), None)
                    if header is None or index is None:
                        return None
                    return header[index] if index < len(header) else f"column {index + 1}"
                if header is None and any(v.strip() for v in values):
                    header = [v.strip() for v in values]
    except (csv.Error, StopIteration, UnicodeDecodeError, OSError):
        return None


@contextmanager
def csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field limit is process-wide (csv.field_size_limit): ours is set for one read
    at a time and the previous one put back, so a program importing svdbatch keeps its own."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _check_header(header: list[str], shown_path: str, line: int, problems: list[Problem]) -> None:
    _check_columns(header, shown_path, line, problems, hint=len(header) == 1, is_header=True)
    seen: set[str] = set()
    for number, name in enumerate(header, start=1):
        if not name:
            problems.append(
                Problem(shown_path, line, None, f"column {number} has no name in the header (a stray ',' at the end?)")
            )
        elif name in seen:
            problems.append(Problem(shown_path, line, name, "column appears twice in the header"))
        seen.add(name)


def _read_csv(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """Header problems go to `problems` (fatal); each row comes with its own."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        records = _csv_rows(csv.reader(handle, strict=True), shown, problems, path)
        first = next(records, None)
        if first is None:
            return
        header_line, header = first
        header = [name.strip() for name in header]
        _check_header(header, shown, header_line, problems)
        for line, values in records:
            if len(values) != len(header):
                yield line, {}, [Problem(shown, line, None, f"row has {len(values)} fields but the header has {len(header)}")]
                continue
            # Empty cells mean "not given": fall back to the config.
            yield line, {k: v for k, v in zip(header, values, strict=False) if v.strip() != ""}, []


def _read_jsonl(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """JSONL has no header, so column problems belong to the row that has them."""
    with path.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                why = f"not valid JSON ({exc.msg}); JSONL needs one whole object per line"
                yield line, {}, [Problem(shown, line, None, why)]
                continue
            except (ValueError, RecursionError) as exc:  # an integer of 5000 digits, [[[[... 100k deep
                yield line, {}, [Problem(shown, line, None, f"JSON that cannot be read ({type(exc).__name__}: {str(exc)[:100]})")]
                continue
            if not isinstance(row, dict):
                yield line, {}, [Problem(shown, line, None, f"must be a JSON object, got {type(row).__name__}")]
                continue
            found: list[Problem] = []
            unknown = _check_columns(list(row), shown, line, found)
            yield line, {k: v for k, v in row.items() if k not in unknown and v is not None}, found


def _read_folder(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """One row per image under the folder, in sorted relative-path order, so ids (from the
    relative paths) and the seeds derived from them are stable across runs and machines.
    Hidden entries, run dirs and the outputs/ folder are skipped: they hold svdbatch's own
    output (gallery thumbnails, PNG frames), which must never come back as input."""
    outputs = os.path.realpath(OUTPUTS_ROOT)
    if is_run_dir(path) or os.path.realpath(path) == outputs:
        what = "a run dir" if is_run_dir(path) else f"the {OUTPUTS_ROOT}/ folder"
        problems.append(Problem(shown, None, None, f"is {what} (svdbatch's output), not a folder of input images"))
        return
    found = []
    for folder, subfolders, files in os.walk(path):  # like rglob: symlinked folders are not entered
        kept = []
        for name in subfolders:
            sub = os.path.join(folder, name)
            if name.startswith("."):
                continue
            if is_run_dir(sub) or os.path.realpath(sub) == outputs:
                log.warning("%s: skipping %s: it holds svdbatch output, not input images", shown, sub)
                continue
            kept.append(name)
        subfolders[:] = kept
        relative_folder = Path(folder).relative_to(path)
        for name in files:
            file = Path(folder, name)
            if file.suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".") and file.is_file():
                found.append((relative_folder / name).as_posix())
    for number, relative in enumerate(sorted(found), start=1):
        yield number, {"image": relative}, []


def _read_single_image(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """`manifest=photo.png`: one row, id from the file name, seed derived from the id."""
    yield 1, {"image": path.name}, []


def _check_columns(
    names: list[str], shown: str, line: int, problems: list[Problem], hint: bool = False, is_header: bool = False
) -> set[str]:
    unknown = {n for n in names if n and n not in KNOWN_COLUMNS and not n.startswith(META_PREFIX)}
    for name in sorted(unknown):
        extra = " (is the file comma-separated?)" if hint and any(c in name for c in ";\t|") else _did_you_mean(name)
        problems.append(
            Problem(
                shown,
                line,
                name,
                f"unknown column{extra}; known: {', '.join(CORE_COLUMNS + PARAM_NAMES)}, or '{META_PREFIX}*' for free-form data",
            )
        )
    if is_header and "image" not in names:
        problems.append(Problem(shown, line, "image", "required column is missing"))
    return unknown


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), KNOWN_COLUMNS, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _encoding_problem(path: Path, shown_path: str, exc: UnicodeDecodeError) -> Problem:
    """Where the file stops being UTF-8 (the reader's error only knows its buffer)."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return Problem(shown_path, None, None, "is UTF-16 text; save it as UTF-8 (in Excel: 'CSV UTF-8')")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return Problem(shown_path, line, None, f"not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8")
    return Problem(shown_path, None, None, f"not UTF-8 text ({exc.reason})")


def _real_root(image_root: str | None) -> str | None:
    """run.image_root as a real path (relative to the working directory), with a trailing separator."""
    if image_root is None:
        return None
    root = os.path.realpath(image_root)
    if not os.path.isdir(root):
        raise ConfigError(f"invalid config:\n  run.image_root: not a folder: {image_root} ({root})")
    return os.path.join(root, "")


def _outside_root(image_path: str, root: str) -> str | None:
    """Why image_path may not be used under run.image_root, or None. realpath, so a symlink
    inside the root that points outside it is caught too."""
    real = os.path.realpath(image_path)
    if real.startswith(root):
        return None
    target = "" if real == image_path else f" (a link to {real})"
    return f"resolves outside run.image_root ({root.rstrip(os.sep) or os.sep}){target}"


def read_manifest(
    path: str | os.PathLike,
    *,
    run_seed: int = 0,
    strict: bool = True,
    check_images: bool | str | ImageCheck = True,
    image_root: str | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    config_params: Mapping[str, Any] | None = None,
    select: Callable[[list[Item]], list[Item]] | None = None,
    image_cache: ImageCache | None = None,
    unique_ids: bool = False,
    shard: tuple[int, int] | None = None,
    parse_cache: Path | None = None,
) -> Manifest:
    """Parse and validate a manifest. Raises ManifestError listing every problem found.

    check_images (run.check_images): full | header | none (True = full, False = none).
    image_root (run.image_root): local images must resolve inside it; None = any path.
    max_image_pixels (run.max_image_pixels): checked from the header unless check_images is none.
    config_params: the config's conditioning values, to check knobs that must agree
    (min <= max guidance) when a row overrides one of them.
    shard: (index, count): only the rows whose id hashes to this shard (shard_of) are
    validated, hashed and kept; the others are read and counted (other_rows). A row whose id
    cannot be told (an unparseable line, no usable id or image) belongs to shard 0. Duplicate
    ids always hash to the same shard, so each shard still finds its own.
    select: the items whose images this process checks (run.limit).
    parse_cache: a folder (the run dir's cache/) where the validated rows are kept, tied to
    the manifest file's path, size and mtime and to these settings: a restart with both
    unchanged reads them back instead of validating every row again (images are still
    checked, through image_cache).
    image_cache: checks already done on unchanged files (the run dir's cache).
    unique_ids: an id derived from the image path (no id column, a folder) that collides with
    an earlier row's is made unique (unique_id) instead of refusing the row: for
    run.emit_manifest, which writes every row out with explicit ids."""
    image_level = image_check_mode(check_images)
    path = Path(path)
    shown = str(path)
    is_folder = path.is_dir()
    if not is_folder and not path.is_file():
        raise ManifestError([Problem(shown, None, None, "manifest file not found")])
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".ndjson": _read_jsonl}
    if is_folder:
        read_rows = _read_folder
    elif suffix in readers:
        read_rows = readers[suffix]
    elif suffix in IMAGE_SUFFIXES:
        read_rows = _read_single_image
    else:
        raise ManifestError(
            [Problem(shown, None, None, "unsupported manifest type; use .csv, .jsonl, a folder of images or one image file")]
        )

    root = _real_root(image_root)
    settings = [run_seed, image_level.value, root, max_image_pixels, dict(config_params or {}), unique_ids, shard]
    cache_file = _parse_cache_file(parse_cache, path, settings) if parse_cache is not None and not is_folder else None
    stamp = _file_stamp(path) if cache_file is not None else None
    manifest = _load_parse_cache(cache_file, path, stamp) if cache_file is not None and stamp is not None else None
    if manifest is None:
        manifest = _validate_rows(
            path, read_rows, run_seed, image_level, root, max_image_pixels, config_params, unique_ids, shard
        )
        refused = manifest.bad_rows and (strict or not manifest.items)  # raised below: nothing worth keeping
        if cache_file is not None and stamp is not None and not refused and _file_stamp(path) == stamp:  # unchanged while read
            _save_parse_cache(cache_file, manifest, stamp)
    row_problems = [problem for _, _, problems in manifest.bad_rows for problem in problems]
    row_problems += _check_item_images(manifest, select, image_level, max_image_pixels, image_cache)
    if row_problems and (strict or not manifest.items):
        row_problems.sort(key=lambda p: p.line or 0)
        raise ManifestError(row_problems)
    return manifest


def _validate_rows(
    path: Path,
    read_rows: Callable[[Path, str, list[Problem]], Iterator[Row]],
    run_seed: int,
    image_level: ImageCheck,
    root: str | None,
    max_image_pixels: int | None,
    config_params: Mapping[str, Any] | None,
    unique_ids: bool,
    shard: tuple[int, int] | None,
) -> Manifest:
    """Every row (of this shard) checked: valid ones become items, the rest bad_rows. Rows
    are streamed, not held: a 1M-row file never exists as 1M row dicts at once."""
    shown = str(path)
    is_folder = path.is_dir()
    file_problems: list[Problem] = []
    manifest = Manifest(path=path)
    base_dir = str(path.resolve() if is_folder else path.resolve().parent)
    first_of: dict[str, tuple[str, int]] = {}  # id_fold(id) -> (id, line)
    no_values: dict[str, Any] = {}  # shared by the rows without overrides or meta_* values (never mutated)
    read = 0
    try:
        for line, row, problems in read_rows(path, shown, file_problems):
            read += 1
            if shard is not None and not _in_shard(row, shard):
                manifest.other_rows += 1
                continue
            _validate_row(
                manifest, first_of, no_values, shown, base_dir, line, row, problems,
                run_seed, image_level, root, max_image_pixels, config_params, unique_ids,
            )  # fmt: skip
    except UnicodeDecodeError as exc:
        raise ManifestError([_encoding_problem(path, shown, exc)]) from None
    if not read and not file_problems:
        empty = f"folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})" if is_folder else "manifest has no rows"
        file_problems.append(Problem(shown, None, None, empty))
    if file_problems:
        raise ManifestError(file_problems)
    return manifest


def row_id(row: Mapping[str, Any]) -> str:
    """The id a row will have (as _validate_row gives it), told cheaply before the row is
    validated, to pick its shard; '' when none can be told."""
    raw_id = row.get("id")
    if raw_id is not None:
        return str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
    image_ref = row.get("image")
    if not isinstance(image_ref, str) or not image_ref.strip() or "\x00" in image_ref or LONE_SURROGATE.search(image_ref):
        return ""
    return derive_id(image_ref.strip())


def shard_of(item_id: str, count: int) -> int:
    """Shard by a hash of the id, not by row position: an item stays in its shard when rows
    are reordered, inserted or removed, so shards resume cleanly after a manifest edit."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


def _in_shard(row: Mapping[str, Any], shard: tuple[int, int]) -> bool:
    index, count = shard
    if count == 1:
        return True
    item_id = row_id(row) if row else ""
    return shard_of(item_id, count) == index if item_id else index == 0


def _validate_row(
    manifest: Manifest,
    first_of: dict[str, tuple[str, int]],
    no_values: dict[str, Any],
    shown: str,
    base_dir: str,
    line: int,
    row: dict[str, Any],
    problems: list[Problem],
    run_seed: int,
    image_level: ImageCheck,
    root: str | None,
    max_image_pixels: int | None,
    config_params: Mapping[str, Any] | None,
    unique_ids: bool,
) -> None:
    """One row: an item appended to manifest.items, or its problems to bad_rows."""
    if problems and not row:  # unparseable line: nothing more to check
        manifest.bad_rows.append((line, None, problems))
        return

    def bad(field_name: str | None, message: str) -> None:
        problems.append(Problem(shown, line, field_name, message))

    for field_name, message in row_value_problems(row):
        bad(field_name, message)

    image_ref = row.get("image")
    if not isinstance(image_ref, str) or not image_ref.strip():
        bad("image", "required" if image_ref is None else f"must be a path string, got {show_value(image_ref)}")
        image_ref = None
    elif "\x00" in image_ref:  # os.path would raise on it
        bad("image", f"contains a NUL character ({image_ref!r})")
        image_ref = None
    elif LONE_SURROGATE.search(image_ref):  # no file name can hold it
        bad("image", f"is not valid Unicode text (a lone surrogate, as JSON's \\ud800 gives): {image_ref!r}")
        image_ref = None
    else:
        image_ref = image_ref.strip()

    raw_id = row.get("id")
    if raw_id is None:
        item_id = derive_id(image_ref) if image_ref else ""
        id_field_given = False
    else:
        item_id = str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
        id_field_given = True
        if not item_id:
            bad("id", f"must be a non-empty string, got {show_value(raw_id)}")
    if item_id:
        why = id_problem(item_id)
        if why:
            if id_field_given:
                bad("id", why)
            else:
                bad("image", f"the id derived from it {why}; give an id column")
            if LONE_SURROGATE.search(item_id):
                item_id = ""  # not even failures.jsonl could record it
        else:
            folded = id_fold(item_id)
            first = first_of.get(folded)
            if first is not None and unique_ids and not id_field_given and image_ref:
                item_id = unique_id(item_id, image_ref, first_of)
                manifest.renamed.append((line, image_ref, item_id))
                folded, first = id_fold(item_id), None
            if first is None:
                first_of[folded] = (item_id, line)
            else:
                why = (
                    f"duplicate id {item_id!r} (first used on line {first[1]})"
                    if first[0] == item_id
                    else f"id {item_id!r} and {first[0]!r} on line {first[1]} differ only by case or Unicode "
                    "normalisation: they would name the same file on macOS and Windows"
                )
                # Derived from two image paths: run.emit_manifest writes them out with unique ids.
                hint = (
                    ""
                    if id_field_given
                    else "; give an id column, or let run.emit_manifest=true write a manifest with unique ids"
                )
                bad("id", why + hint)

    seed_derived = "seed" not in row
    seed = 0
    if not seed_derived:
        try:
            seed = _coerce_seed(row["seed"])
        except ValueProblem as exc:
            bad("seed", str(exc))

    overrides: dict[str, Any] = {}
    for name in PARAM_NAMES:
        if name in row:
            try:
                overrides[name] = coerce(name, row[name])
            except ValueProblem as exc:
                bad(name, str(exc))
    guidance = [name for name in ("min_guidance_scale", "max_guidance_scale") if name in overrides]
    if config_params is not None and guidance:
        for _, why in combination_problems({**config_params, **overrides}):
            other = {"min_guidance_scale", "max_guidance_scale"}.difference(guidance)
            bad(guidance[0], why + "".join(f" ({name} from the config)" for name in other))
    resize = row.get("resize")
    if resize is not None:
        resize = str(resize).strip()
        if resize not in RESIZE_MODES:
            bad("resize", f"must be one of {', '.join(RESIZE_MODES)}, got {row['resize']!r}")

    image_path = None
    if image_ref:
        if is_url(image_ref):
            why = url_problem(image_ref)  # fetched at plan time; a failed fetch fails only this item
            if why:
                bad("image", f"{why} ({image_ref})")
        else:
            # normpath, not resolve(): no symlink walk per row (a 100k-row manifest)
            # unless run.image_root asks for one.
            image_path = os.path.normpath(os.path.join(base_dir, image_ref))
            why = _outside_root(image_path, root) if root else None
            if why is None and problems:  # a bad row: report its image too, now (good rows: below, in bulk)
                try:
                    check_image(image_path, decode=image_level, max_pixels=max_image_pixels)
                except ImageProblem as exc:
                    why = str(exc)
            if why:
                bad("image", f"{why} ({image_ref})")

    if problems:
        manifest.bad_rows.append((line, item_id or None, problems))
        return
    if seed_derived:
        seed = derive_seed(run_seed, item_id)
    assert image_ref is not None  # a row without a usable image has a problem: skipped above
    manifest.items.append(
        Item(
            id=item_id,
            image=image_path,
            image_ref=image_ref,
            seed=seed,
            seed_derived=seed_derived,
            overrides=overrides or no_values,
            meta={k: v for k, v in row.items() if k.startswith(META_PREFIX)} or no_values,
            manifest=shown,
            line=line,
            resize=resize,
        )
    )


# Bump when what the parse cache holds, or how a row is validated, changes meaning.
PARSE_CACHE_VERSION = 2
PARSE_CACHE_PREFIX = "rows-"  # cache/rows-<digest>.json


def _file_stamp(path: Path) -> list[int] | None:
    """What ties cached rows to the file: size, mtime, inode and ctime (an edit, a `touch`,
    a replaced file change one of them)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def _parse_cache_file(folder: Path, path: Path, settings: list[Any]) -> Path:
    """rows-<manifest and shard>-<the other settings>.json: shards sharing the run dir keep
    one file each; a save removes the same shard's files of other settings (_save_parse_cache)."""
    *checks, shard = settings

    def digest(what: Any) -> str:
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    rows = digest([os.path.realpath(path), str(path), shard])
    return folder / f"{PARSE_CACHE_PREFIX}{rows}-{digest([PARSE_CACHE_VERSION, checks])}.json"


def _save_parse_cache(target: Path, manifest: Manifest, stamp: list[int]) -> None:
    """The validated rows as columns (a million small JSON objects would load slowly), with
    the file's stamp from before it was read; a failed write only costs the next run a full
    validation."""
    items = manifest.items
    images: dict[str | None, int] = {}
    refs: dict[str, int] = {}
    body = {
        "version": PARSE_CACHE_VERSION,
        "stamp": stamp,
        "ids": [item.id for item in items],
        "image": [images.setdefault(item.image, len(images)) for item in items],
        "ref": [refs.setdefault(item.image_ref, len(refs)) for item in items],
        "seed": [item.seed for item in items],
        "derived": [item.seed_derived for item in items],
        "line": [item.line for item in items],
        "overrides": {n: item.overrides for n, item in enumerate(items) if item.overrides},
        "meta": {n: item.meta for n, item in enumerate(items) if item.meta},
        "resize": {n: item.resize for n, item in enumerate(items) if item.resize is not None},
        "images": list(images),
        "refs": list(refs),
        "bad_rows": [
            [line, item_id, [[p.file, p.line, p.field, p.message, p.item_id] for p in problems]]
            for line, item_id, problems in manifest.bad_rows
        ],
        "renamed": manifest.renamed,
        "other_rows": manifest.other_rows,
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, json.dumps(body, allow_nan=False, separators=(",", ":")).encode())
        same_rows = target.name.rsplit("-", 1)[0]
        for stale in target.parent.glob(f"{same_rows}-*.json"):  # this manifest and shard, other settings
            if stale != target:
                stale.unlink(missing_ok=True)
    except (OSError, ValueError) as exc:
        log.debug("%s: not cached (%s)", target, exc)


def _load_parse_cache(source: Path, path: Path, stamp: list[int]) -> Manifest | None:
    """The rows validated by an earlier run, if the file and settings are unchanged; else None
    (also for a damaged cache file: the manifest is validated again)."""
    try:
        return _read_parse_cache(source, path, stamp)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def _read_parse_cache(source: Path, path: Path, stamp: list[int]) -> Manifest | None:
    try:
        body = json.loads(source.read_bytes())
    except (OSError, ValueError):
        body = None
    if not isinstance(body, dict) or body.get("version") != PARSE_CACHE_VERSION or body.get("stamp") != stamp:
        return None
    shown = str(path)
    images, refs = body["images"], body["refs"]
    no_values: dict[str, Any] = {}
    manifest = Manifest(path=path, cached=True, other_rows=body["other_rows"])
    columns = (body["ids"], body["image"], body["ref"], body["seed"], body["derived"], body["line"])
    manifest.items = items = [
        Item(item_id, images[image], refs[ref], seed, derived, no_values, no_values, shown, line)
        for item_id, image, ref, seed, derived, line in zip(*columns, strict=True)
    ]
    for n, overrides in body["overrides"].items():  # the few rows with values of their own
        items[int(n)].overrides = overrides
    for n, meta in body["meta"].items():
        items[int(n)].meta = meta
    for n, resize in body["resize"].items():
        items[int(n)].resize = resize
    manifest.bad_rows = [
        (line, item_id, [Problem(*problem) for problem in problems]) for line, item_id, problems in body["bad_rows"]
    ]
    manifest.renamed = [(line, image, new_id) for line, image, new_id in body["renamed"]]
    return manifest


def _check_item_images(
    manifest: Manifest,
    select: Callable[[list[Item]], list[Item]] | None,
    level: ImageCheck,
    max_pixels: int | None,
    cache: ImageCache | None,
) -> list[Problem]:
    """Check the local images of the selected valid rows in one go (threads, cache), and move
    the rows whose image fails to bad_rows. Returns their problems."""
    chosen = select(manifest.items) if select else manifest.items
    found = check_image_files((item.image for item in chosen if item.image is not None), level, max_pixels, cache)
    bad = {item.id: item for item in chosen if item.image is not None and found.get(item.image)}
    if not bad:
        return []
    problems = []
    for item in bad.values():
        assert item.image is not None  # bad holds only rows with a local image
        problem = Problem(item.manifest, item.line, "image", f"{found[item.image]} ({item.image_ref})")
        problems.append(problem)
        manifest.bad_rows.append((item.line, item.id, [problem]))
    manifest.items = [item for item in manifest.items if item.id not in bad]
    manifest.bad_rows.sort(key=lambda row: row[0])
    return problems


def csv_holds(items: list[Item]) -> bool:
    """Whether a CSV gives these items back exactly: its cells are text, and an empty or blank
    cell means 'not given', so every meta_* value must be non-blank text (JSONL otherwise)."""
    return all(isinstance(value, str) and value.strip() for item in items for value in item.meta.values())


def manifest_row(item: Item, folder: Path) -> dict[str, Any]:
    """A row that gives `item` again: explicit id and seed, the image relative to `folder`
    (a URL as it is), the row's resize, overrides and meta_* values, typed."""
    image = item.url or os.path.relpath(item.image or "", folder).replace(os.sep, "/")
    row: dict[str, Any] = {"id": item.id, "image": image, "seed": item.seed}
    if item.resize:
        row["resize"] = item.resize
    return {**row, **item.overrides, **item.meta}


def write_manifest(items: list[Item], target: Path) -> None:
    """A manifest that gives exactly these items again, for editing: a CSV (target .csv; only
    when csv_holds) or JSONL (.jsonl), image paths relative to the file."""
    folder = target.parent.resolve()
    rows = [manifest_row(item, folder) for item in items]
    if target.suffix == ".jsonl":
        body = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    else:
        columns = list(dict.fromkeys(["id", "image", "seed", "resize", *PARAM_NAMES]))
        columns = [c for c in columns if any(c in row for row in rows)]
        columns += sorted({key for item in items for key in item.meta})
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row.get(column, "") for column in columns] for row in rows)
        body = buffer.getvalue()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, body.encode())
