"""Quality of a generated item: its signals, the rules that make it a dud, redo seeds.

torch-free and numpy-free (the driver and `svdbatch validate` import it): the signals are
measured by core/measure.py (numpy, OpenCV) on the worker side and by `svdbatch score`;
this module only names them, checks the `quality` config group and judges them.

    signal            unit / meaning (docs/quality.md)
    motion            mean optical-flow magnitude between consecutive frames, in % of the frame's width per frame
    motion_max        the largest per-pair mean of the above
    brightness_min    darkest frame's mean luma, 0..1
    brightness_max    brightest frame's mean luma, 0..1
    contrast_min      lowest per-frame luma standard deviation, 0..1
    black_frames      frames whose mean luma is below BLACK_LUMA
    white_frames      frames whose mean luma is above WHITE_LUMA
    flat_frames       frames whose luma standard deviation is below FLAT_STD (black and white frames included)
    flicker           largest jump of mean luma between consecutive frames, 0..1
    first_frame_psnr  PSNR of the first frame against the conditioning image (dB, capped at 100); null without one

A dud is an item that breaks a rule. With quality.max_attempts=N a dud is generated again
with attempt_seed(row seed, attempt), up to N attempts in all; attempt 0 is the row's own
seed, so with quality off nothing changes (keys, frames, outputs).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

# Thresholds of the frame counts (luma on a 0..1 scale).
BLACK_LUMA = 16 / 255
WHITE_LUMA = 239 / 255
FLAT_STD = 4 / 255
PSNR_CAP = 100.0  # identical images: PSNR is infinite, JSON has no infinity
MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class Signals:
    """One video's quality signals (module docstring: units)."""

    motion: float
    motion_max: float
    brightness_min: float
    brightness_max: float
    contrast_min: float
    black_frames: int
    white_frames: int
    flat_frames: int
    flicker: float
    first_frame_psnr: Optional[float] = None  # noqa: UP045 (one style with config.py)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signals:
        values: dict[str, Any] = {name: data.get(name) for name in SIGNALS}
        return cls(**values)


SIGNALS: tuple[str, ...] = tuple(f.name for f in fields(Signals))


@dataclass
class QualityConfig:
    """The `quality` group (conf/quality/): rules on the signals, off by default. A rule is
    min_<signal> or max_<signal>; null = no rule. An item breaking any rule is a dud."""

    name: str = "off"
    min_motion: Optional[float] = None  # noqa: UP045 (OmegaConf reads Optional, not `X | None`)
    max_motion: Optional[float] = None  # noqa: UP045
    max_black_frames: Optional[int] = None  # noqa: UP045  (0: no black frame at all)
    max_white_frames: Optional[int] = None  # noqa: UP045
    max_flat_frames: Optional[int] = None  # noqa: UP045
    max_flicker: Optional[float] = None  # noqa: UP045
    min_contrast_min: Optional[float] = None  # noqa: UP045
    min_first_frame_psnr: Optional[float] = None  # noqa: UP045
    # Attempts per item in all: a dud is generated again with a new seed derived from the
    # row's seed and the attempt number, up to max_attempts; 1 = judge only, never redo.
    max_attempts: int = 1


def rules(quality: QualityConfig | None) -> dict[tuple[str, str], float]:
    """{(signal, 'min'|'max'): threshold} of the rules that are set."""
    out = {}
    for f in fields(QualityConfig):
        bound, _, signal = f.name.partition("_")
        value = getattr(quality, f.name, None)
        if bound in ("min", "max") and signal in SIGNALS and value is not None:
            out[(signal, bound)] = value
    return out


def redoes(quality: QualityConfig | None) -> bool:
    """Whether duds are generated again (the rules then choose which frames an item keeps)."""
    return quality is not None and int(quality.max_attempts) > 1 and bool(rules(quality))


def key_part(quality: QualityConfig | None) -> dict[str, Any]:
    """What the quality settings add to every item's key: nothing unless duds are redone
    (then the rules and attempts decide the kept frames, so changing them redoes items)."""
    if quality is None or not redoes(quality):
        return {}
    named = {f"{bound}_{signal}": value for (signal, bound), value in sorted(rules(quality).items())}
    return {"quality": {"rules": named, "max_attempts": int(quality.max_attempts)}}


def verdict(signals: dict[str, Any], quality: QualityConfig | None) -> list[str]:
    """The rules `signals` break, as 'motion 0.01 < min 0.5'; empty: not a dud."""
    if quality is None:
        return []
    broken = []
    for (signal, bound), limit in sorted(rules(quality).items()):
        value = signals.get(signal)
        if value is None:
            continue  # not measurable here (no conditioning image): no verdict
        if (bound == "min" and value < limit) or (bound == "max" and value > limit):
            broken.append(f"{signal} {value:.4g} {'<' if bound == 'min' else '>'} {bound} {limit:g}")
    return broken


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` (0-based) of an item whose row seed is `seed`: the row
    seed itself for attempt 0, then a hash of both (stable across machines and versions)."""
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"svdbatch-attempt:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def check_quality(quality: QualityConfig) -> list[str]:
    """Problems of the quality group, each naming its key (engine/checks.py gathers them)."""
    problems = []
    known = {f.name for f in fields(QualityConfig)}
    for name in known - {"name", "max_attempts"}:
        bound, _, signal = name.partition("_")
        value = getattr(quality, name, None)
        if bound not in ("min", "max") or signal not in SIGNALS:  # a schema field naming no signal: a bug
            problems.append(f"quality.{name}: names no signal (signals: {', '.join(SIGNALS)})")
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"quality.{name}: must be a number or null, got {value!r}")
        elif not math.isfinite(value) or value < 0:
            problems.append(f"quality.{name}: must be a finite number >= 0 or null, got {value}")
    for signal in SIGNALS:
        low, high = getattr(quality, f"min_{signal}", None), getattr(quality, f"max_{signal}", None)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            problems.append(f"quality.min_{signal}: {low} is above quality.max_{signal} ({high}): no item could pass")
    attempts = quality.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS:
        problems.append(f"quality.max_attempts: must be an integer in [1, {MAX_ATTEMPTS}], got {attempts!r}")
    return problems
