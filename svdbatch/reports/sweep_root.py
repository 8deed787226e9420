"""A sweep root as Hydra leaves it: its points (one run dir each) and what was swept.

Hydra's multirun writes multirun.yaml into the sweep root and .hydra/overrides.yaml into
every point's folder; readers (status, the comparison page, run.reuse) find the points here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from svdbatch.rundir import records

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


MULTIRUN_RECORD = "multirun.yaml"  # Hydra's sweeper writes it into the sweep root


POINT_RECORD = Path(".hydra") / "overrides.yaml"  # Hydra writes it into every job's output dir


MAX_POINT_DEPTH = 4  # how deep under the root a point's folder may be (sweep.subdir may nest)


# -- the sweep root and its points ------------------------------------------------------
def is_sweep_root(path: Path) -> bool:
    return (Path(path) / MULTIRUN_RECORD).is_file()


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def point_dirs(root: Path) -> list[Path]:
    """Every run dir under the sweep root that Hydra ran a job in, in folder order."""
    root = Path(root)
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if (path / POINT_RECORD).is_file():
                found.append(path)
            elif depth < MAX_POINT_DEPTH and not records.has_records(path):  # never into a run dir's own folders
                walk(path, depth + 1)

    walk(root, 1)
    return found


def parse_override_list(overrides: Iterable[str]) -> dict[str, str]:
    """'key=value' strings (as in .hydra/overrides.yaml) -> {key: value}; '+'/'~' prefixes dropped."""
    parsed: dict[str, str] = {}
    for text in overrides or []:
        key, _, value = str(text).partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


@dataclass
class SweepSpec:
    """What the sweep root's record says: the swept keys and every point's values."""

    swept: list[str] = field(default_factory=list)  # keys with several values, command-line order
    points: list[dict[str, str]] = field(default_factory=list)  # swept key -> value, per job
    ignored: set[str] = field(default_factory=set)  # keys that do not split folders (shards, ...)


def read_sweep_spec(root: Path) -> SweepSpec:
    record = read_yaml(Path(root) / MULTIRUN_RECORD) or {}
    hydra_cfg = record.get("hydra") or {}
    task = ((hydra_cfg.get("overrides") or {}).get("task")) or []
    exclude = (((hydra_cfg.get("job") or {}).get("config") or {}).get("override_dirname") or {}).get("exclude_keys") or []
    # Shards of one run share its folder: a shard index never tells points apart.
    spec = SweepSpec(ignored=set(exclude) | {"run.shard.index", "run.shard.count"})
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([str(t) for t in task])
    except Exception as exc:  # an unreadable record: points are still listed, unlabelled by it
        log.debug("sweep: cannot parse %s: %s", root / MULTIRUN_RECORD, exc)
        return spec
    values: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override() and override.is_discrete_sweep():
            key = override.get_key_element().lstrip("+~")
            if key in spec.ignored:
                continue
            spec.swept.append(key)
            values.append(list(override.sweep_string_iterator()))
    from itertools import product

    spec.points = [dict(zip(spec.swept, combo, strict=False)) for combo in product(*values)] if spec.swept else []
    return spec


@dataclass
class Point:
    run_dir: Path
    overrides: dict[str, str]  # the job's own overrides (key -> value)
    label: dict[str, str]  # the swept values that tell this point apart

    @property
    def title(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.label.items()) or self.run_dir.name

    @property
    def short_title(self) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.label.items()) or self.run_dir.name


def sweep_points(root: Path, spec: SweepSpec | None = None) -> list[Point]:
    """The sweep's points that have a run dir, in the sweep's own order (as the command
    listed the values), labelled with their swept values."""
    spec = spec or read_sweep_spec(root)
    points = [Point(d, parse_override_list(read_yaml(d / POINT_RECORD) or []), {}) for d in point_dirs(root)]
    keys = list(spec.swept)
    if not keys:  # no record of what was swept: the keys whose values differ between points
        seen: dict[str, set] = {}
        for point in points:
            for key, value in point.overrides.items():
                seen.setdefault(key, set()).add(value)
        keys = [k for k, v in seen.items() if len(v) > 1 or any(k not in p.overrides for p in points)]
        keys = [k for k in keys if k not in spec.ignored]
    for point in points:
        point.label = {k: point.overrides[k] for k in keys if k in point.overrides}
    order = {tuple(sorted(p.items())): n for n, p in enumerate(spec.points)}
    points.sort(key=lambda p: (order.get(tuple(sorted(p.label.items())), len(order)), str(p.run_dir)))
    return points


def unstarted_points(spec: SweepSpec, points: list[Point]) -> list[dict[str, str]]:
    """Points the sweep will run that have no run dir yet (a sequential sweep in progress)."""
    have = {tuple(sorted(p.label.items())) for p in points}
    missing, seen = [], set()
    for values in spec.points:
        signature = tuple(sorted(values.items()))
        if signature not in have and signature not in seen:
            seen.add(signature)
            missing.append(values)
    return missing


# -- shadowed knobs -----------------------------------------------------------------------
def swept_knobs(spec: SweepSpec) -> dict[str, str]:
    """Swept conditioning knobs: {knob: 'conditioning.knob'} (what a manifest row may override)."""
    return {key.split(".", 1)[1]: key for key in spec.swept if key.startswith("conditioning.") and key.count(".") == 1}
