"""A run's cards, the contact sheet's and the sweep page's unit: one per item (done, missing,
failed, invalid), read from the run dir's records and sidecars, and each done card's media: the
source thumbnail and the animated preview, made once into <run dir>/gallery/."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.config import FetchConfig
from svdbatch.core.jsonl import latest_by_id
from svdbatch.inputs.fetch import UrlCache
from svdbatch.inputs.images import load_rgb
from svdbatch.reports.html import esc, url
from svdbatch.rundir import records
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.layout import asset_relpath, layout_version, make_parents, sidecar_path_in, sidecar_relpath
from svdbatch.rundir.run_dirs import run_cwd
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarError
from svdbatch.rundir.store import DOWNLOADS_DIR, is_invalid_record, parse_time

log = logging.getLogger(__name__)

THUMB_PX = 256


@dataclass
class Card:
    item_id: str
    kind: str  # done | missing (done, video since deleted) | failed | invalid
    when: datetime | None
    record: dict[str, Any] = field(default_factory=dict)  # results or failures line
    sidecar: Sidecar | None = None  # None: missing or unreadable (the card uses `record`)


def collect_cards(run_dir: Path) -> list[Card]:
    """One card per item id (its latest state), plus one per invalid row without an id;
    newest first."""
    failures_log = records.read_failures(run_dir)
    cards: dict[str, Card] = {}
    for item_id, record in records.latest_results(run_dir).items():
        present = output_intact(run_dir, record)
        cards[item_id] = Card(item_id, "done" if present else "missing", parse_time(record.get("finished_at")), record)
    for item_id, record in latest_by_id(failures_log).items():
        card = Card(item_id, "invalid" if is_invalid_record(record) else "failed", parse_time(record.get("time")), record)
        previous = cards.get(item_id)
        # A done item stays done; a deleted video gives way to a newer failure (a redo that failed).
        if previous is None or (previous.kind == "missing" and not (previous.when and card.when and previous.when > card.when)):
            cards[item_id] = card
    idless = {r.get("line"): r for r in failures_log if r.get("id") is None}  # latest per manifest line
    listed = list(cards.values()) + [Card(f"line {line}", "invalid", parse_time(r.get("time")), r) for line, r in idless.items()]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(listed, key=lambda c: c.when or oldest, reverse=True)


def cards_of(run_dir: Path, ids: Iterable[str]) -> dict[str, Card]:
    """The cards of these ids only, from their sidecars and the failure records, without
    reading the results records: a big sweep's page shows a few hundred of its items."""
    failures = records.latest_failures(run_dir)
    layout = layout_version(run_dir)
    cards: dict[str, Card] = {}
    for item_id in ids:
        try:
            sidecar, size = Sidecar.read_with_size(run_dir / sidecar_relpath(item_id, layout))
        except (OSError, SidecarError):
            sidecar = None
        if sidecar is not None and sidecar.done:
            record = sidecar.result_record(size)
            kind = "done" if output_intact(run_dir, record, layout) else "missing"
            cards[item_id] = Card(item_id, kind, parse_time(sidecar.finished_at), record, sidecar)
            continue
        failure = failures.get(item_id)
        if failure is not None:
            kind = "invalid" if is_invalid_record(failure) else "failed"
            cards[item_id] = Card(item_id, kind, parse_time(failure.get("time")), failure)
    return cards


def read_sidecar(run_dir: Path, item_id: str) -> tuple[Sidecar | None, float]:
    """(sidecar, its mtime); (None, 0) if missing or unreadable."""
    path = sidecar_path_in(run_dir, item_id)
    try:
        return Sidecar.read(path), path.stat().st_mtime
    except (OSError, SidecarError):
        return None, 0.0


# -- thumbnails and previews ----------------------------------------------------------
def source_candidates(run_dir: Path, path: str | None, image_url: str | None) -> list[Path]:
    """Where the source image may be: its recorded path (relative paths are relative to
    the cwd of the run), or for an image URL the run's download cache, also if moved."""
    found: list[Path] = []
    if path:
        recorded = Path(path)
        cwd = run_cwd(run_dir)
        found += [recorded] if recorded.is_absolute() else ([cwd / recorded] if cwd else []) + [recorded]
        if image_url:
            found.append(run_dir / DOWNLOADS_DIR / recorded.name)
    if image_url:
        found.append(UrlCache(run_dir / DOWNLOADS_DIR, FetchConfig()).path_for(image_url))
    return found


def source_of(card: Card) -> tuple[str | None, str | None]:
    """(path, url) of a done card's source image: from its sidecar, else its results line."""
    if card.sidecar is not None:
        return card.sidecar.image.path, card.sidecar.image.url
    return card.record.get("image_path"), None


def fresh(target: Path, than_mtime: float) -> bool:
    try:
        return target.stat().st_mtime >= than_mtime
    except OSError:
        return False


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return buffer.getvalue()


def source_thumbnail(run_dir: Path, item_id: str, image: tuple[str | None, str | None], sidecar_mtime: float) -> str | None:
    """gallery/<bucket>/<id>.jpg (made now if missing or older than the sidecar) of the source
    image at `image` (path, url: source_of); None if the source cannot be found or read."""
    relative = asset_relpath(item_id, ".jpg")
    target = run_dir / relative
    if fresh(target, sidecar_mtime):
        return relative
    for source in source_candidates(run_dir, *image):
        if not source.is_file():
            continue
        try:
            thumb = load_rgb(source)  # EXIF orientation and alpha handled as for generation
            thumb.thumbnail((THUMB_PX, THUMB_PX))
            make_parents(run_dir, target)
            atomic_write_bytes(target, jpeg_bytes(thumb))
            return relative
        except Exception as exc:  # a bad source must not cost the page
            log.debug("gallery: no thumbnail for %s from %s: %s", item_id, source, exc)
    return relative if target.is_file() else None


def frames_preview(run_dir: Path, item_id: str, frames_dir: Path, fps: float, sidecar_mtime: float) -> str | None:
    """gallery/<bucket>/<id>.webp: a small animated preview of a folder of PNG frames."""
    relative = asset_relpath(item_id, ".webp")
    target = run_dir / relative
    if fresh(target, sidecar_mtime):
        return relative
    paths = sorted(frames_dir.glob("*.png"))
    if not paths:
        return None
    try:
        frames = []
        for path in paths:
            with Image.open(path) as frame:
                small = frame.convert("RGB")
                small.thumbnail((THUMB_PX, THUMB_PX))
                frames.append(small)
        buffer = io.BytesIO()
        frames[0].save(
            buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / (fps or 7)), loop=0, quality=80
        )
        make_parents(run_dir, target)
        atomic_write_bytes(target, buffer.getvalue())
        return relative
    except Exception as exc:
        log.debug("gallery: no preview for %s: %s", item_id, exc)
        middle = paths[len(paths) // 2]
        return middle.relative_to(run_dir).as_posix()


def media_box(inner: str, label: str, width: Any, height: Any) -> str:
    ratio = f"aspect-ratio:{int(width)}/{int(height)}" if width and height else ""
    return f'<figure style="{ratio}">{inner}<figcaption>{esc(label)}</figcaption></figure>'


def preview_html(run_dir: Path, card: Card, sidecar_mtime: float) -> str:
    output = card.sidecar.output if card.sidecar is not None else None
    path = output.path if output is not None else card.record.get("output")
    fmt = output.format if output is not None else Path(str(card.record.get("output", ""))).suffix.lstrip(".")
    if card.kind == "missing" or not path:
        return '<div class="na">video missing</div>'
    if fmt == "mp4":
        return f'<video src="{url(path)}" autoplay muted loop playsinline></video>'
    if fmt in ("gif", "webp"):
        return f'<img src="{url(path)}" alt="preview" loading="lazy">'
    preview = frames_preview(
        run_dir, card.item_id, run_dir / path, (output.fps if output is not None else None) or 7, sidecar_mtime
    )
    return f'<img src="{url(preview)}" alt="preview" loading="lazy">' if preview else '<div class="na">no frames</div>'
