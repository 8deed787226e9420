"""Generation parameters: the rules for each knob, and how config and a row combine.

The same rules check the composed config at start-up and every manifest row, so a value
that is rejected in a row is rejected in the config too, with the same message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from PIL import ImageColor

from svdbatch.core.config import ConditioningConfig, MemoryConfig, ModelConfig, ResizeMode

# Bump when load_rgb/prepare change how they turn the same bytes into pixels.
PREPROCESS_VERSION = 1
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # run.max_image_pixels


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
    max_image_pixels: int | None = field(default=DEFAULT_MAX_IMAGE_PIXELS, compare=False)

    @classmethod
    def from_config(cls, cond: Any, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Preprocess:
        return cls(
            resize=ResizeMode(cond.resize),
            pad_color=parse_color(cond.pad_color),
            background=parse_color(cond.background),
            max_image_pixels=max_image_pixels,
        )

    @classmethod
    def from_record(cls, record: dict[str, Any], max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Preprocess:
        """The inverse of as_dict (a sidecar's `preprocess`); its `version` is not checked here."""
        return cls(
            resize=ResizeMode(record["resize"]),
            pad_color=tuple(record["pad_color"]),
            background=tuple(record["background"]),
            max_image_pixels=max_image_pixels,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": PREPROCESS_VERSION,
            "resize": self.resize.value,
            "pad_color": list(self.pad_color),
            "background": list(self.background),
        }


@dataclass(frozen=True)
class Rule:
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    multiple_of: int | None = None
    nullable: bool = False

    def describe(self) -> str:
        parts = ["an integer" if self.kind is int else "a number"]
        if self.low is not None and self.high is not None:
            parts.append(f"in [{self.low:g}, {self.high:g}]")
        elif self.low is not None:
            parts.append(f">= {self.low:g}")
        if self.multiple_of:
            parts.append(f"and a multiple of {self.multiple_of}")
        return " ".join(parts)


def _rule(kind: type, low: float | None = None, high: float | None = None, **more: Any) -> Any:
    """A GenParams field's rule, kept in the field's metadata so the fields are the one list."""
    return field(metadata={"rule": Rule(kind, low, high, **more)})


@dataclass(frozen=True)
class GenParams:
    """Everything the pipeline call needs besides the image and the generator. Its fields
    are the knobs a config or a manifest row sets (PARAM_NAMES), each with its rule.

    Ranges follow the model card / diffusers pipeline: the UNet was trained with
    motion_bucket_id in 0..255, the VAE needs sizes that are multiples of 8. num_frames >= 2:
    StableVideoDiffusionPipeline decides on classifier-free guidance from max_guidance_scale,
    then again from the per-frame scales linspace(min, max, num_frames); with one frame that
    is just min, the two disagree and every item fails with a tensor-size error."""

    width: int = _rule(int, 8, 16384, multiple_of=8)
    height: int = _rule(int, 8, 16384, multiple_of=8)
    num_frames: int = _rule(int, 2, 1024, nullable=True)
    num_inference_steps: int = _rule(int, 1, 1000)
    fps: int = _rule(int, 1, 1000)
    motion_bucket_id: int = _rule(int, 0, 255)
    noise_aug_strength: float = _rule(float, 0, 10)
    min_guidance_scale: float = _rule(float, 0, 100)
    max_guidance_scale: float = _rule(float, 0, 100)
    decode_chunk_size: int = _rule(int, 1, 1024, nullable=True)
    # nullable: a config or row may leave num_frames and decode_chunk_size null; ParamDefaults
    # resolves them, so a GenParams always holds numbers.

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PARAM_NAMES}  # asdict() deep-copies: slow at 100k rows

    def batch_signature(self) -> tuple:
        """Items with equal signatures may share one pipeline call (all fields are per call)."""
        return tuple(self.as_dict().values())


RULES: dict[str, Rule] = {knob.name: knob.metadata["rule"] for knob in fields(GenParams)}
PARAM_NAMES = tuple(RULES)
# The same disagreement in another form: the pipeline compares max_guidance_scale > 1 in
# Python floats, then the per-frame scales in the model's dtype, where a value just above 1
# rounds to 1 (float16 steps by ~0.001 there, bfloat16 by ~0.008). 1.01 clears both.
GUIDANCE_ROUNDING_GAP = (1.0, 1.01)


class ValueProblem(ValueError):
    """A single value broke its rule; the message says what was expected."""


def show_value(value: Any, limit: int = 60) -> str:
    """A value for a message: JSON's spelling and type for non-strings (a JSONL column
    may mix them), long text cut short."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (list, dict)):
        return f"a JSON {'list' if isinstance(value, list) else 'object'}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def _parse_number(text: str, kind: type) -> Any:
    """ASCII decimal text only: Python's int()/float() also take '1_000' and other scripts'
    digits, which no spreadsheet means. '7.0' is accepted for integers, as JSON's 7.0 is
    (pandas writes integer columns with gaps that way)."""
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            pass
    return float(text)


def coerce(name: str, value: Any) -> Any:
    """Turn a config/CSV/JSON value into the parameter's type, or raise ValueProblem."""
    rule = RULES[name]
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if rule.nullable:
            return None
        raise ValueProblem(f"must be {rule.describe()}, got an empty value")
    number = _as_number(rule, value)
    if (rule.low is not None and number < rule.low) or (rule.high is not None and number > rule.high):
        raise ValueProblem(f"must be {rule.describe()}, got {value!r}")
    if rule.multiple_of and number % rule.multiple_of:
        raise ValueProblem(f"must be {rule.describe()}, got {value!r}")
    low, high = GUIDANCE_ROUNDING_GAP
    if name == "max_guidance_scale" and low < number < high:
        raise ValueProblem(
            f"must be <= {low:g} (no guidance) or >= {high:g}, got {value!r}: the pipeline rounds values in between "
            f"to {low:g} in the model's precision after deciding to guide, and every item fails"
        )
    return number


def _as_number(rule: Rule, value: Any) -> int | float:
    """A given (not empty) value as the rule's kind: a finite number, an int only if whole."""
    if isinstance(value, str):
        try:
            number: Any = _parse_number(value.strip(), rule.kind)
        except ValueError:
            raise ValueProblem(f"must be {rule.describe()}, got {show_value(value)}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        raise ValueProblem(f"must be {rule.describe()}, got {show_value(value)}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueProblem(f"must be {rule.describe()}, got {value!r} (not a finite number)")
    if rule.kind is not int:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise ValueProblem(f"must be {rule.describe()}, got {value!r}")
    return int(number)


def combination_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, why) for knobs that are fine alone but not together. `values` holds
    min_guidance_scale and max_guidance_scale (config defaults merged with a row's overrides)."""
    low, high = values["min_guidance_scale"], values["max_guidance_scale"]
    if low > high:
        # The per-frame scales would fall from min to max; the pipeline decides on guidance
        # from max alone and fails every item when min > 1 >= max.
        return [("min_guidance_scale", f"min_guidance_scale ({low:g}) must be <= max_guidance_scale ({high:g})")]
    return []


def check_conditioning(cond: ConditioningConfig) -> list[str]:
    """Problems in the composed conditioning config, as 'conditioning.<field>: why'."""
    problems = []
    for name in PARAM_NAMES:
        try:
            coerce(name, getattr(cond, name))
        except ValueProblem as exc:
            problems.append(f"conditioning.{name}: {exc}")
    if not problems:
        guidance = {"min_guidance_scale": cond.min_guidance_scale, "max_guidance_scale": cond.max_guidance_scale}
        problems += [f"conditioning.{name}: {why}" for name, why in combination_problems(guidance)]
    for name in ("pad_color", "background"):
        try:
            parse_color(getattr(cond, name))
        except ValueError as exc:
            problems.append(f"conditioning.{name}: {exc}")
    return problems


def check_model_and_memory(model: ModelConfig, memory: MemoryConfig) -> list[str]:
    """The model's trained frame count stands in for a null conditioning.num_frames, and the
    memory preset caps decode_chunk_size, so they obey the same rules."""
    problems = []
    checks: list[tuple[str, str, float | None]] = [
        ("model.num_frames", "num_frames", model.num_frames),
        ("memory.max_decode_chunk_size", "decode_chunk_size", memory.max_decode_chunk_size),
    ]
    for shown, name, value in checks:
        try:
            coerce(name, value)
        except ValueProblem as exc:
            problems.append(f"{shown}: {exc}")
    for name, value in dict(model.fixed_conditioning or {}).items():
        if name not in RULES:
            problems.append(f"model.fixed_conditioning: unknown parameter {name!r}; known: {', '.join(PARAM_NAMES)}")
            continue
        try:
            coerce(name, value)
        except ValueProblem as exc:
            problems.append(f"model.fixed_conditioning.{name}: {exc}")
    return problems


@dataclass(frozen=True)
class ParamDefaults:
    """The composed config's side of every item's parameters, read once per run (reading
    an OmegaConf node per row would dominate planning a 100k-row manifest)."""

    values: dict[str, Any]
    model_num_frames: int
    max_decode_chunk_size: int | None
    # Rows share a few distinct override sets: resolve each once.
    _resolved: dict[tuple, GenParams] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def resolve(self, overrides: Mapping[str, Any]) -> GenParams:
        """Composed config, then the row's overrides, then the memory preset's caps."""
        signature = tuple(overrides.items())
        params = self._resolved.get(signature)
        if params is None:
            params = self._resolved[signature] = self._resolve(overrides)
        return params

    def _resolve(self, overrides: Mapping[str, Any]) -> GenParams:
        values = {**self.values, **overrides}
        if values["num_frames"] is None:
            values["num_frames"] = self.model_num_frames
        if values["decode_chunk_size"] is None:
            values["decode_chunk_size"] = values["num_frames"]  # diffusers' default: all at once
        if self.max_decode_chunk_size is not None:
            values["decode_chunk_size"] = min(values["decode_chunk_size"], self.max_decode_chunk_size)
        # A chunk larger than the video decodes exactly like the whole video: normalise it so
        # equal outputs get equal keys.
        values["decode_chunk_size"] = min(values["decode_chunk_size"], values["num_frames"])
        return GenParams(**values)


def param_defaults(cond: ConditioningConfig, model: ModelConfig, memory: MemoryConfig) -> ParamDefaults:
    return ParamDefaults(
        values={name: getattr(cond, name) for name in PARAM_NAMES},
        model_num_frames=model.num_frames,
        max_decode_chunk_size=memory.max_decode_chunk_size,
    )


def resolve_params(cond: ConditioningConfig, model: ModelConfig, memory: MemoryConfig, overrides: Mapping[str, Any]) -> GenParams:
    return param_defaults(cond, model, memory).resolve(overrides)
