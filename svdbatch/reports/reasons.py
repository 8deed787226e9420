"""Failure messages and manifest problems grouped into reasons: particulars (paths, URLs,
values, numbers) replaced, so the same failure on many items reads as one line with a count."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"()<>]*[^\s'\"()<>:,.;]", re.IGNORECASE)  # not a trailing ':' or '.'
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"[\w.~-]*(?:/[\w.~@+%-]+)+/?")
_HEX = re.compile(r"\b[0-9a-f]{8,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_LOCATION = re.compile(r"^.*?:\d+: ")  # 'manifest.csv:12: ' in front of a manifest problem
_FIELD = re.compile(r"^field '([^']*)': ")


def first_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0] if lines else ""


def normalise_error(text: str) -> str:
    """An error message with its particulars (paths, URLs, quoted values, numbers) replaced,
    so the same failure on different items groups together."""
    line = first_line(text) or "(no message)"
    line = _URL.sub("<url>", line)
    line = _QUOTED.sub("'…'", line)
    line = _PATH.sub("<path>", line)
    line = _HEX.sub("<hex>", line)
    line = _NUMBER.sub("#", line)
    return re.sub(r"\s+", " ", line)[:200]


def normalise_problem(text: str) -> str:
    """A manifest problem ('m.csv:3: field 'seed': must be ...') grouped by field and message."""
    text = _LOCATION.sub("", str(text or "").strip(), count=1)
    match = _FIELD.match(text)
    if match:
        return f"field '{match.group(1)}': {normalise_error(text[match.end() :])}"
    return normalise_error(text)


@dataclass
class Reason:
    reason: str
    count: int
    example_id: str
    example: str  # the first example's own message, particulars included


def group_reasons(examples: Iterable[tuple[str, str]], normalise: Callable[[str], str] = normalise_error) -> list[Reason]:
    """(id, message) pairs -> one Reason per normalised message, most frequent first
    (ties: first seen first)."""
    counter: Counter[str] = Counter()
    first: dict[str, tuple[str, str]] = {}  # insertion order = first seen
    for item_id, message in examples:
        reason = normalise(message)
        counter[reason] += 1
        first.setdefault(reason, (item_id, message))
    rank = {reason: n for n, reason in enumerate(first)}
    ranked = sorted(first, key=lambda reason: (-counter[reason], rank[reason]))
    return [Reason(r, counter[r], first[r][0], first_line(first[r][1])) for r in ranked]
