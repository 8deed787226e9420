"""Manifest formats: a CSV, a JSONL file, a folder of images or one image file -> raw rows
(line, values, problems found while reading), and items -> a manifest file again (write_manifest)."""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.errors import ManifestError
from svdbatch.core.params import PARAM_NAMES
from svdbatch.inputs.items import Item, Problem
from svdbatch.rundir.run_dirs import is_run_dir
from svdbatch.rundir.store import OUTPUTS_ROOT

log = logging.getLogger(__name__)

META_PREFIX = "meta_"  # free-form columns carried into the sidecar untouched
CORE_COLUMNS = ("id", "image", "seed", "resize")  # resize: per-row conditioning.resize
KNOWN_COLUMNS = frozenset(CORE_COLUMNS + PARAM_NAMES)
# Python's csv module refuses fields over 128 KiB by default; a long caption in a meta_*
# column is legitimate, so the limit is raised to this (characters).
CSV_FIELD_LIMIT = 16 * 2**20
# Files a folder manifest picks up (hidden files and folders are skipped).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
Row = tuple[int, dict[str, Any], list[Problem]]  # line, values, problems found while reading
RowReader = Callable[[Path, str, list[Problem]], Iterator[Row]]  # (file, its name as shown, file-level problems) -> rows


def row_reader(path: Path) -> RowReader:
    """The reader for this manifest (by its suffix; a folder reads its images). Raises
    ManifestError for a path that is missing or of no known type."""
    shown = str(path)
    is_folder = path.is_dir()
    if not is_folder and not path.is_file():
        raise ManifestError([Problem(shown, None, None, "manifest file not found")])
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".ndjson": _read_jsonl}
    if is_folder:
        return _read_folder
    if suffix in readers:
        return readers[suffix]
    if suffix in IMAGE_SUFFIXES:
        return _read_single_image
    raise ManifestError(
        [Problem(shown, None, None, "unsupported manifest type; use .csv, .jsonl, a folder of images or one image file")]
    )


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


def encoding_problem(path: Path, shown_path: str, exc: UnicodeDecodeError) -> Problem:
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
