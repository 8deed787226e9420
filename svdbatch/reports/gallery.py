"""<run dir>/index.html: a contact sheet of the run, one card per item, newest first.

Done items show a thumbnail of the source image, an animated preview (the mp4 in a
<video> tag, the gif/webp itself, or an animated webp made from PNG frames) and the
parameters that shaped it; failed items show a red card with the error. The page is
self-contained (inline CSS, no scripts, no network) and uses relative URLs only, so a
copied or served run dir still works. Thumbnails and previews go to <run dir>/gallery/,
made once per item (cards.py): the source may live elsewhere, or be a URL download.

Everything is read from the run dir (its records, records.py, and the sidecars), so any
process sharing the run dir may rewrite the page; it is replaced atomically.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from svdbatch.core.atomic import DISK_FULL_ERRNOS, atomic_write_bytes
from svdbatch.core.quality import SIGNALS
from svdbatch.reports.cards import Card, collect_cards, media_box, preview_html, read_sidecar, source_of, source_thumbnail
from svdbatch.reports.html import CSS, esc, number, url
from svdbatch.rundir.store import GALLERY_PAGE, INVALID_ROW

log = logging.getLogger(__name__)

INDEX = GALLERY_PAGE
MAX_TRACEBACK_CHARS = 4000


def params_html(card: Card) -> str:
    sidecar, record = card.sidecar, card.record
    params = sidecar.params if sidecar is not None else {}
    size = f"{params['width']}×{params['height']}" if "width" in params and "height" in params else None
    seconds = sidecar.timings.total_s if sidecar is not None else record.get("seconds")
    fields = [
        ("seed", sidecar.seed if sidecar is not None else record.get("seed")),
        ("motion", params.get("motion_bucket_id")),
        ("noise aug", number(params.get("noise_aug_strength"), 4) if "noise_aug_strength" in params else None),
        ("fps", params.get("fps")),
        ("frames", params.get("num_frames")),
        ("size", size),
        ("steps", params.get("num_inference_steps")),
        ("seconds", number(seconds) if seconds is not None else None),
    ]
    cells = "".join(f"<div><dt>{esc(name)}</dt><dd>{esc(value)}</dd></div>" for name, value in fields if value is not None)
    return f'<dl class="params">{cells}</dl>'


def is_dud(card: Card) -> bool:
    return card.kind in ("done", "missing") and card.record.get("dud") is True


def quality_html(card: Card) -> str:
    """The item's main signals, and for a dud the rules its kept attempt broke."""
    signals = card.record.get("signals")
    if not isinstance(signals, dict):
        return ""
    shown = [("motion", signals.get("motion")), ("first-frame PSNR", signals.get("first_frame_psnr"))]
    shown += [("flicker", signals.get("flicker"))]
    shown += [(name, signals.get(name)) for name in ("black_frames", "white_frames", "flat_frames") if signals.get(name)]
    attempts = card.record.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        shown.append(("attempts", attempts))
    cells = "".join(f"<div><dt>{esc(n)}</dt><dd>{esc(number(v, 3))}</dd></div>" for n, v in shown if v is not None)
    verdict = ""
    if is_dud(card) and card.sidecar is not None and card.sidecar.quality is not None:
        broken = card.sidecar.quality.kept_attempt.verdict
        verdict = f'<p class="verdict">{esc("; ".join(broken))}</p>'
    return f'<dl class="params signals">{cells}</dl>{verdict}'


def signal_of(card: Card, name: str) -> float | None:
    """A done card's recorded signal (its results line), None if it has none."""
    signals = card.record.get("signals") if card.kind in ("done", "missing") else None
    found = signals.get(name) if isinstance(signals, dict) else None
    return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None


_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*(-?[0-9.eE+-]+)\s*$")
_COMPARE = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__}


def parse_condition(text: str) -> tuple[str, str, float]:
    """'motion<0.5' -> ('motion', '<', 0.5); ValueError naming what is wrong."""
    match = _CONDITION.match(text)
    if not match:
        raise ValueError(f"{text!r}: expected SIGNAL<VALUE (or <=, >, >=), e.g. motion<0.5")
    name, op, value = match.groups()
    if name not in SIGNALS:
        raise ValueError(f"{text!r}: unknown signal {name!r}; signals: {', '.join(SIGNALS)}")
    try:
        return name, op, float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number") from None


def order_cards(
    cards: list[Card],
    sort_by: str | None = None,
    ascending: bool = False,
    duds: str = "all",
    where: tuple[tuple[str, str, float], ...] = (),
) -> list[Card]:
    """`cards` filtered (duds: all | only | hide; `where`: conditions on signals, which only
    done cards with those signals meet) and sorted by a signal (largest first unless
    `ascending`); cards without that signal (failed, made before signals) keep their order after."""
    if duds == "only":
        cards = [c for c in cards if is_dud(c)]
    elif duds == "hide":
        cards = [c for c in cards if not is_dud(c)]
    for name, op, limit in where:
        cards = [c for c in cards if (v := signal_of(c, name)) is not None and _COMPARE[op](v, limit)]
    if sort_by is None:
        return cards
    measured = [c for c in cards if signal_of(c, sort_by) is not None]
    measured.sort(key=lambda c: signal_of(c, sort_by) or 0.0, reverse=not ascending)  # stable: ties keep newest first
    return measured + [c for c in cards if signal_of(c, sort_by) is None]


def done_card(run_dir: Path, card: Card) -> str:
    card.sidecar, mtime = read_sidecar(run_dir, card.item_id)
    thumb = source_thumbnail(run_dir, card.item_id, source_of(card), mtime)
    source = f'<img src="{url(thumb)}" alt="source" loading="lazy">' if thumb else '<div class="na">source not available</div>'
    # Both boxes take the video's shape, so a row of cards lines up; the source is fitted inside.
    shape = (card.sidecar.output.width, card.sidecar.output.height) if card.sidecar is not None else (None, None)
    boxes = media_box(source, "source", *shape) + media_box(preview_html(run_dir, card, mtime), "video", *shape)
    note = '<p class="note">video missing (deleted?): the next run redoes it</p>' if card.kind == "missing" else ""
    dud = is_dud(card)
    badge = '<p class="badge dud" title="broke a quality rule (docs/quality.md)">dud</p>' if dud else ""
    return (
        f'<article class="card {card.kind}{" dud" if dud else ""}"><div class="media">{boxes}</div>'
        f'{badge}<h2 title="{esc(card.item_id)}">{esc(card.item_id)}</h2>{params_html(card)}{quality_html(card)}{note}</article>'
    )


def failed_card(card: Card) -> str:
    record = card.record
    label = INVALID_ROW if card.kind == "invalid" else "failed"
    problems = record.get("problems") or []
    details = "".join(f"<li>{esc(p)}</li>" for p in problems)
    error = f'<ul class="error">{details}</ul>' if details else f'<p class="error">{esc(record.get("error", "(no message)"))}</p>'
    trace = record.get("traceback")
    trace_html = f"<details><summary>traceback</summary><pre>{esc(trace[-MAX_TRACEBACK_CHARS:])}</pre></details>" if trace else ""
    where = [
        f"line {record['line']}" if record.get("line") is not None else "",
        card.when.strftime("%Y-%m-%d %H:%M:%S") if card.when else "",
    ]
    return (
        f'<article class="card {card.kind}"><p class="badge">{esc(label)}</p>'
        f'<h2 title="{esc(card.item_id)}">{esc(card.item_id)}</h2>{error}{trace_html}'
        f'<p class="meta">{esc(" · ".join(w for w in where if w))}</p></article>'
    )


def page_html(run_dir: Path, cards: list[Card], shown: list[str], view: str = "") -> str:
    counts = {kind: sum(c.kind == kind for c in cards) for kind in ("done", "missing", "failed", "invalid")}
    duds = sum(is_dud(c) for c in cards)
    parts = [f"{counts['done']} done"]
    parts += [f'<span class="bad">{duds} duds</span>'] if duds else []
    parts += [f'<span class="bad">{counts[k]} {k}</span>' for k in ("failed", "invalid") if counts[k]]
    parts += [f"{counts['missing']} video missing"] if counts["missing"] else []
    if view:
        parts.append(esc(view))
    if len(shown) < len(cards):
        parts.append(f"showing {'the first' if view else 'the newest'} {len(shown)} of {len(cards)}")
    parts.append(f"updated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC")
    title = esc(run_dir.resolve().name)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title} · svdbatch</title><style>{CSS}</style></head><body>"
        f"<header><h1>{title}</h1><p>{' · '.join(parts)}</p></header>"
        f"<main>{''.join(shown)}</main></body></html>\n"
    )


def write_gallery(
    run_dir: Path,
    max_items: int = 500,
    sort_by: str | None = None,
    ascending: bool = False,
    duds: str = "all",
    where: tuple[tuple[str, str, float], ...] = (),
) -> Path:
    """Rewrite <run dir>/index.html from the run dir; newest `max_items` cards (0 = all), or
    filtered and sorted by a quality signal (order_cards; `svdbatch gallery --sort`)."""
    run_dir = Path(run_dir)
    if sort_by is not None and sort_by not in SIGNALS:
        raise ValueError(f"unknown signal {sort_by!r}; signals: {', '.join(SIGNALS)}")
    cards = order_cards(collect_cards(run_dir), sort_by, ascending, duds, where)
    chosen = cards if max_items <= 0 else cards[:max_items]
    shown = [done_card(run_dir, c) if c.kind in ("done", "missing") else failed_card(c) for c in chosen]
    view = ", ".join(
        ([f"sorted by {sort_by} ({'ascending' if ascending else 'descending'})"] if sort_by else [])
        + ([f"duds: {duds}"] if duds != "all" else [])
        + [f"{name} {op} {limit:g}" for name, op, limit in where]
    )
    target = run_dir / INDEX
    atomic_write_bytes(target, page_html(run_dir, cards, shown, view).encode("utf-8"))
    return target


class GalleryUpdater:
    """Keeps index.html current while a run goes on. maybe_update() after each finished
    item rewrites it at most every `every_s` seconds; update() at the end, always.
    A gallery problem is logged, never raised: it must not fail the batch."""

    def __init__(self, run_dir: Path, every_s: float = 10.0, max_items: int = 500):
        self.run_dir = Path(run_dir)
        self.every_s = every_s
        self.max_items = max_items
        self._last: float | None = None
        self._lock = threading.Lock()  # the driver may call from its writer threads
        # Leftover temporaries in gallery/ are removed with the run dir's (RunStore.prepare).

    def maybe_update(self) -> Path | None:
        if self._last is not None and time.monotonic() - self._last < self.every_s:
            return None
        if not self._lock.acquire(blocking=False):
            return None  # another thread is writing it right now
        try:
            return self._write()
        finally:
            self._lock.release()

    def update(self, raise_disk_full: bool = False) -> Path | None:
        """`raise_disk_full`: a full disk raises (the driver stops the run with exit 3)."""
        with self._lock:
            return self._write(raise_disk_full)

    def _write(self, raise_disk_full: bool = False) -> Path | None:
        self._last = time.monotonic()  # also after a failure: do not retry on every item
        try:
            return write_gallery(self.run_dir, self.max_items)
        except OSError as exc:
            if raise_disk_full and exc.errno in DISK_FULL_ERRNOS:
                raise
            log.warning("gallery: could not write %s: %s", self.run_dir / INDEX, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return None
        except Exception as exc:
            log.warning("gallery: could not write %s: %s", self.run_dir / INDEX, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return None
