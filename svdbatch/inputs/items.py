"""What reading a manifest gives: the validated Item of one row, the Manifest (items, bad rows,
renamed ids) and the Problem that names a file, line and field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svdbatch.inputs.fetch import is_url


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
