"""One raw row -> an Item or its problems: every field checked (image, id, seed, overrides,
resize, meta_* values), ids kept unique across the rows read so far."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from svdbatch.core.config import ImageCheck, ResizeMode
from svdbatch.core.errors import ConfigError
from svdbatch.core.params import PARAM_NAMES, ValueProblem, coerce, combination_problems, show_value
from svdbatch.inputs.fetch import is_url, url_problem
from svdbatch.inputs.ids import LONE_SURROGATE, derive_id, derive_seed, id_fold, id_problem, unique_id
from svdbatch.inputs.images import ImageProblem, check_image
from svdbatch.inputs.items import Item, Manifest, Problem
from svdbatch.inputs.manifest_formats import META_PREFIX

SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1
Bad = Callable[[str | None, str], None]  # reports a problem with one field of the row being checked
RESIZE_MODES = tuple(mode.value for mode in ResizeMode)
SEED_TEXT = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take '1_0' or '٣'


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


def real_root(image_root: str | None) -> str | None:
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


@dataclass(frozen=True)
class RowChecks:
    """What every row is checked against: read_manifest's settings."""

    run_seed: int
    image_level: ImageCheck
    root: str | None  # real_root(run.image_root)
    max_image_pixels: int | None
    config_params: Mapping[str, Any] | None
    unique_ids: bool


class RowValidator:
    """Validates a manifest's rows one at a time: each becomes an item in manifest.items or
    its problems go to manifest.bad_rows. Remembers the ids taken so far (by id_fold), so a
    duplicate is caught however the rows are ordered."""

    def __init__(self, manifest: Manifest, checks: RowChecks, base_dir: str) -> None:
        self.manifest = manifest
        self.checks = checks
        self.base_dir = base_dir  # what relative image paths are relative to
        self.shown = str(manifest.path)
        self.first_of: dict[str, tuple[str, int]] = {}  # id_fold(id) -> (id, line)
        self.no_values: dict[str, Any] = {}  # shared by the rows without overrides or meta_* values (never mutated)

    def add(self, line: int, row: dict[str, Any], problems: list[Problem]) -> None:
        """One row: an item appended to manifest.items, or its problems to bad_rows."""
        if problems and not row:  # unparseable line: nothing more to check
            self.manifest.bad_rows.append((line, None, problems))
            return

        def bad(field_name: str | None, message: str) -> None:
            problems.append(Problem(self.shown, line, field_name, message))

        for field_name, message in row_value_problems(row):
            bad(field_name, message)
        image_ref = _image_ref(row, bad)
        item_id = self._item_id(row, image_ref, line, bad)
        seed_derived = "seed" not in row
        seed = 0 if seed_derived else _seed(row, bad)
        overrides = self._overrides(row, bad)
        resize = _resize(row, bad)
        image_path = self._image_path(image_ref, problems, bad) if image_ref else None
        if problems:
            self.manifest.bad_rows.append((line, item_id or None, problems))
            return
        if seed_derived:
            seed = derive_seed(self.checks.run_seed, item_id)
        assert image_ref is not None  # a row without a usable image has a problem: skipped above
        self.manifest.items.append(
            Item(
                id=item_id,
                image=image_path,
                image_ref=image_ref,
                seed=seed,
                seed_derived=seed_derived,
                overrides=overrides or self.no_values,
                meta={k: v for k, v in row.items() if k.startswith(META_PREFIX)} or self.no_values,
                manifest=self.shown,
                line=line,
                resize=resize,
            )
        )

    def _item_id(self, row: Mapping[str, Any], image_ref: str | None, line: int, bad: Bad) -> str:
        """The row's id, given or derived from the image; checked, and taken unless an
        earlier row has it. '' when there is none to record."""
        raw_id = row.get("id")
        if raw_id is None:
            item_id = derive_id(image_ref) if image_ref else ""
            id_field_given = False
        else:
            item_id = str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
            id_field_given = True
            if not item_id:
                bad("id", f"must be a non-empty string, got {show_value(raw_id)}")
        if not item_id:
            return item_id
        why = id_problem(item_id)
        if why:
            if id_field_given:
                bad("id", why)
            else:
                bad("image", f"the id derived from it {why}; give an id column")
            if LONE_SURROGATE.search(item_id):
                item_id = ""  # not even failures.jsonl could record it
            return item_id
        return self._take_id(item_id, id_field_given, image_ref, line, bad)

    def _take_id(self, item_id: str, id_field_given: bool, image_ref: str | None, line: int, bad: Bad) -> str:
        """Take a valid id for this row, or report the earlier row that has it (the same
        file name on macOS and Windows); with unique_ids, a derived id is renamed instead."""
        folded = id_fold(item_id)
        first = self.first_of.get(folded)
        if first is not None and self.checks.unique_ids and not id_field_given and image_ref:
            item_id = unique_id(item_id, image_ref, self.first_of)
            self.manifest.renamed.append((line, image_ref, item_id))
            folded, first = id_fold(item_id), None
        if first is None:
            self.first_of[folded] = (item_id, line)
        else:
            why = (
                f"duplicate id {item_id!r} (first used on line {first[1]})"
                if first[0] == item_id
                else f"id {item_id!r} and {first[0]!r} on line {first[1]} differ only by case or Unicode "
                "normalisation: they would name the same file on macOS and Windows"
            )
            # Derived from two image paths: run.emit_manifest writes them out with unique ids.
            hint = "" if id_field_given else "; give an id column, or let run.emit_manifest=true write a manifest with unique ids"
            bad("id", why + hint)
        return item_id

    def _overrides(self, row: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        """The row's conditioning values, typed by the config's rules; a min/max guidance
        that disagrees with the config's other one is reported on the row's."""
        overrides: dict[str, Any] = {}
        for name in PARAM_NAMES:
            if name in row:
                try:
                    overrides[name] = coerce(name, row[name])
                except ValueProblem as exc:
                    bad(name, str(exc))
        guidance = [name for name in ("min_guidance_scale", "max_guidance_scale") if name in overrides]
        config_params = self.checks.config_params
        if config_params is not None and guidance:
            for _, why in combination_problems({**config_params, **overrides}):
                other = {"min_guidance_scale", "max_guidance_scale"}.difference(guidance)
                bad(guidance[0], why + "".join(f" ({name} from the config)" for name in other))
        return overrides

    def _image_path(self, image_ref: str, problems: list[Problem], bad: Bad) -> str | None:
        """The local image's normalised path (None for a URL). A bad row's image is checked
        now, to report it with the rest; good rows' images are checked later, in bulk."""
        if is_url(image_ref):
            why = url_problem(image_ref)  # fetched at plan time; a failed fetch fails only this item
            if why:
                bad("image", f"{why} ({image_ref})")
            return None
        # normpath, not resolve(): no symlink walk per row (a 100k-row manifest)
        # unless run.image_root asks for one.
        image_path = os.path.normpath(os.path.join(self.base_dir, image_ref))
        root = self.checks.root
        why = _outside_root(image_path, root) if root else None
        if why is None and problems:  # a bad row: report its image too, now (good rows: below, in bulk)
            try:
                check_image(image_path, decode=self.checks.image_level, max_pixels=self.checks.max_image_pixels)
            except ImageProblem as exc:
                why = str(exc)
        if why:
            bad("image", f"{why} ({image_ref})")
        return image_path


def _image_ref(row: Mapping[str, Any], bad: Bad) -> str | None:
    """The image as written (stripped), or None when it is missing or no path can hold it."""
    image_ref = row.get("image")
    if not isinstance(image_ref, str) or not image_ref.strip():
        bad("image", "required" if image_ref is None else f"must be a path string, got {show_value(image_ref)}")
        return None
    if "\x00" in image_ref:  # os.path would raise on it
        bad("image", f"contains a NUL character ({image_ref!r})")
        return None
    if LONE_SURROGATE.search(image_ref):  # no file name can hold it
        bad("image", f"is not valid Unicode text (a lone surrogate, as JSON's \\ud800 gives): {image_ref!r}")
        return None
    return image_ref.strip()


def _seed(row: Mapping[str, Any], bad: Bad) -> int:
    try:
        return _coerce_seed(row["seed"])
    except ValueProblem as exc:
        bad("seed", str(exc))
        return 0


def _resize(row: Mapping[str, Any], bad: Bad) -> str | None:
    resize = row.get("resize")
    if resize is not None:
        resize = str(resize).strip()
        if resize not in RESIZE_MODES:
            bad("resize", f"must be one of {', '.join(RESIZE_MODES)}, got {row['resize']!r}")
    return resize
