"""Manifest files (CSV or JSONL) or a folder of images -> validated items.

Everything is checked before any model loads, and every problem is reported at once as
``file:line: field 'x': what is wrong``. File-level problems (unreadable file, unknown
columns, no rows) are always fatal; row-level problems are fatal in strict mode and
otherwise skip just that row (the driver records it in failures.jsonl).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlsplit

from .config import ResizeMode
from .fetch import is_url, url_problem
from .images import ImageProblem, check_image
from .params import PARAM_NAMES, ValueProblem, coerce

SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1
META_PREFIX = "meta_"  # free-form columns carried into the sidecar untouched
CORE_COLUMNS = ("id", "image", "seed", "resize")  # resize: per-row conditioning.resize
KNOWN_COLUMNS = frozenset(CORE_COLUMNS + PARAM_NAMES)
RESIZE_MODES = tuple(mode.value for mode in ResizeMode)
MAX_ID_LENGTH = 200
# Path separators, characters Windows/SMB shares reject, and control characters.
UNSAFE_ID_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f]')
# Files a folder manifest picks up (hidden files and folders are skipped).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Item:
    """One validated manifest row."""

    id: str
    image: Optional[str]  # absolute, normalised path (a str: cheap for 100k rows); None for a URL
    image_ref: str  # the image as written in the manifest (a path or an http(s) URL)
    seed: int
    seed_derived: bool
    overrides: dict[str, Any]  # per-row conditioning overrides, already typed
    meta: dict[str, Any]
    manifest: str
    line: int
    # Per-row conditioning.resize (how the image is fitted, not a pipeline argument); None = the config's.
    resize: Optional[str] = None

    @property
    def url(self) -> Optional[str]:
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
    line: Optional[int]
    field: Optional[str]
    message: str
    item_id: Optional[str] = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"


class ManifestError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in the manifest:"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class Manifest:
    path: Path
    items: list[Item] = field(default_factory=list)
    # Rows that failed validation (only non-empty when not strict): (line, id or None, problems).
    bad_rows: list[tuple[int, Optional[str], list[Problem]]] = field(default_factory=list)


def derive_seed(run_seed: int, item_id: str) -> int:
    """A stable per-item seed from the run seed and the item id (never from a global RNG)."""
    digest = hashlib.sha256(f"svdbatch-seed:{run_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def derive_id(image_ref: str) -> str:
    """An id from the image path: 'a/b/cat.png' -> 'a__b__cat', 'https://host/x/cat.jpg' -> 'host__x__cat'."""
    if is_url(image_ref):
        parts = urlsplit(image_ref)
        image_ref = f"{(parts.hostname or '')}/{unquote(parts.path)}"
    parts = [p for p in PurePosixPath(image_ref.replace("\\", "/")).with_suffix("").parts if p not in ("", ".", "..", "/")]
    return "__".join(parts)


def id_problem(item_id: str) -> Optional[str]:
    """Ids become file names inside the run dir, so they must not be able to escape it."""
    if not item_id:
        return "must not be empty"
    if len(item_id) > MAX_ID_LENGTH:
        return f"must be at most {MAX_ID_LENGTH} characters"
    if item_id.startswith("."):
        return f"must not start with '.' (got {item_id!r})"
    if UNSAFE_ID_CHARS.search(item_id):
        return f"must not contain path separators, control or reserved characters (got {item_id!r})"
    return None


def _coerce_seed(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueProblem(f"must be an integer in [0, 2**64), got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise ValueProblem(f"must be an integer in [0, 2**64), got {value!r}")
        value = int(text)
    if not isinstance(value, int):
        raise ValueProblem(f"must be an integer in [0, 2**64), got {value!r}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueProblem(f"must be an integer in [0, 2**64), got {value}")
    return value


Row = tuple[int, dict[str, Any], list[Problem]]  # line, values, problems found while reading


def _read_csv(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """Header problems go to `problems` (fatal); each row comes with its own."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        header = [name.strip() for name in header]
        _check_columns(header, shown, 1, problems, hint=len(header) == 1, is_header=True)
        seen: set[str] = set()
        for name in header:
            if name in seen:
                problems.append(Problem(shown, 1, name, "column appears twice in the header"))
            seen.add(name)
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                yield line, {}, [Problem(shown, line, None, f"row has {len(values)} fields but the header has {len(header)}")]
                continue
            # Empty cells mean "not given": fall back to the config.
            yield line, {k: v for k, v in zip(header, values) if v.strip() != ""}, []


def _read_jsonl(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """JSONL has no header, so column problems belong to the row that has them."""
    with path.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, {}, [Problem(shown, line, None, f"not valid JSON ({exc.msg})")]
                continue
            if not isinstance(row, dict):
                yield line, {}, [Problem(shown, line, None, f"must be a JSON object, got {type(row).__name__}")]
                continue
            found: list[Problem] = []
            unknown = _check_columns(list(row), shown, line, found)
            yield line, {k: v for k, v in row.items() if k not in unknown and v is not None}, found


def _read_folder(path: Path, shown: str, problems: list[Problem]) -> Iterator[Row]:
    """One row per image under the folder, in sorted relative-path order, so ids (from the
    relative paths) and the seeds derived from them are stable across runs and machines."""
    found = []
    for file in path.rglob("*"):
        relative = file.relative_to(path)
        if file.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in relative.parts) and file.is_file():
            found.append(relative.as_posix())
    for number, relative in enumerate(sorted(found), start=1):
        yield number, {"image": relative}, []


def _check_columns(
    names: list[str], shown: str, line: int, problems: list[Problem], hint: bool = False, is_header: bool = False
) -> set[str]:
    unknown = {n for n in names if n not in KNOWN_COLUMNS and not n.startswith(META_PREFIX)}
    for name in sorted(unknown):
        extra = " (is the file comma-separated?)" if hint and any(c in name for c in ";\t|") else ""
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


def read_manifest(path: str | os.PathLike, *, run_seed: int = 0, strict: bool = True, check_images: bool = True) -> Manifest:
    """Parse and validate a manifest. Raises ManifestError listing every problem found."""
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
    else:
        raise ManifestError([Problem(shown, None, None, "unsupported manifest type; use .csv, .jsonl or a folder of images")])

    file_problems: list[Problem] = []
    row_problems: list[Problem] = []
    manifest = Manifest(path=path)
    base_dir = str(path.resolve() if is_folder else path.resolve().parent)
    first_line_of: dict[str, int] = {}
    try:
        rows = list(read_rows(path, shown, file_problems))
    except UnicodeDecodeError as exc:
        raise ManifestError([Problem(shown, None, None, f"not UTF-8 text ({exc.reason})")]) from None
    if not rows and not file_problems:
        empty = f"folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})" if is_folder else "manifest has no rows"
        file_problems.append(Problem(shown, None, None, empty))
    if file_problems:
        raise ManifestError(file_problems)

    for line, row, problems in rows:
        if problems and not row:  # unparseable line: nothing more to check
            row_problems.extend(problems)
            manifest.bad_rows.append((line, None, problems))
            continue

        def bad(field_name: Optional[str], message: str) -> None:
            problems.append(Problem(shown, line, field_name, message))

        image_ref = row.get("image")
        if not isinstance(image_ref, str) or not image_ref.strip():
            bad("image", "required" if image_ref is None else f"must be a path string, got {image_ref!r}")
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
                bad("id", f"must be a non-empty string, got {raw_id!r}")
        if item_id:
            why = id_problem(item_id)
            if why:
                if id_field_given:
                    bad("id", why)
                else:
                    bad("image", f"the id derived from it {why}; give an id column")
            elif item_id in first_line_of:
                bad("id", f"duplicate id {item_id!r} (first used on line {first_line_of[item_id]})")
            else:
                first_line_of[item_id] = line

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
                # normpath, not resolve(): no symlink walk per row (a 100k-row manifest).
                image_path = os.path.normpath(os.path.join(base_dir, image_ref))
                try:
                    check_image(image_path, decode=check_images)
                except ImageProblem as exc:
                    bad("image", f"{exc} ({image_ref})")

        if problems:
            row_problems.extend(problems)
            manifest.bad_rows.append((line, item_id or None, problems))
            continue
        if seed_derived:
            seed = derive_seed(run_seed, item_id)
        manifest.items.append(
            Item(
                id=item_id,
                image=image_path,
                image_ref=image_ref,
                seed=seed,
                seed_derived=seed_derived,
                overrides=overrides,
                meta={k: v for k, v in row.items() if k.startswith(META_PREFIX)},
                manifest=shown,
                line=line,
                resize=resize,
            )
        )

    if row_problems and (strict or not manifest.items):
        raise ManifestError(row_problems)
    return manifest


def write_manifest(items: list[Item], target: Path) -> None:
    """A CSV that gives exactly these items again (explicit ids and seeds, the rows'
    overrides and meta columns), image paths relative to the CSV, for editing."""
    from .outputs import atomic_write_bytes  # outputs is a leaf module; imported here to keep manifest light

    overrides = [name for name in PARAM_NAMES if any(name in item.overrides for item in items)]
    resize = ["resize"] if any(item.resize for item in items) else []
    meta = sorted({key for item in items for key in item.meta})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "image", "seed", *resize, *overrides, *meta])
    for item in items:
        image = item.url or os.path.relpath(item.image, target.parent.resolve()).replace(os.sep, "/")
        extra = [item.overrides.get(name, "") for name in overrides] + [item.meta.get(key, "") for key in meta]
        writer.writerow([item.id, image, item.seed, *([item.resize or ""] if resize else []), *extra])
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue().encode())
