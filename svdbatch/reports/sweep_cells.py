"""The sweep page's cells: one point's video of one item (its poster, the first frame, made
once), a failure or pending mark, and the cell cache that lets a big sweep's page be rewritten
from two stats per cell."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.reports.cards import THUMB_PX, cards_of, fresh, jpeg_bytes, preview_html, read_sidecar
from svdbatch.reports.html import esc, url
from svdbatch.reports.sweep_root import Point
from svdbatch.rundir.layout import asset_relpath, layout_version, make_parents, sidecar_relpath
from svdbatch.rundir.store import CACHE_DIR

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

POSTER_SUFFIX = ".first.jpg"  # <point>/gallery/<id>.first.jpg: the video's first frame, small


POSTER_THREADS = 4  # ffmpeg processes making posters at once


def first_frame(path: Path) -> Image.Image:
    """The first frame of an output (mp4, gif, webp, or a folder of PNG frames) as a PIL image."""
    from PIL import Image

    if path.is_dir():
        frames = sorted(path.glob("*.png"))
        with Image.open(frames[0]) as image:
            return image.convert("RGB")
    if path.suffix == ".mp4":
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path))
        try:
            meta = next(reader)
            width, height = meta["size"]
            return Image.frombytes("RGB", (width, height), next(reader))
        finally:
            reader.close()
    with Image.open(path) as image:
        image.seek(0)
        return image.convert("RGB")


def poster(run_dir: Path, item_id: str, output: Path, sidecar_mtime: float) -> str | None:
    """<point>/gallery/<bucket>/<id>.first.jpg (made once per finished item); path relative to the point."""

    relative = asset_relpath(item_id, POSTER_SUFFIX)
    target = run_dir / relative
    if fresh(target, sidecar_mtime):
        return relative
    try:
        image = first_frame(output)
        image.thumbnail((THUMB_PX, THUMB_PX))
        make_parents(run_dir, target)
        atomic_write_bytes(target, jpeg_bytes(image))
        return relative
    except Exception as exc:  # a poster is a nicety: never cost the page
        log.debug("sweep page: no poster for %s in %s: %s", item_id, run_dir, exc)
        return relative if target.is_file() else None


@dataclass
class Cell:
    kind: str  # done | missing | failed | invalid | pending
    media: str = ""  # HTML
    note: str = ""  # HTML
    params: dict[str, Any] = field(default_factory=dict)


def cell_html(point: Point, card: Any, titles: dict[str, str]) -> Cell:

    if card is None:
        return Cell("pending", '<div class="na">pending</div>')
    if card.kind in ("failed", "invalid"):
        error = (card.record.get("problems") or [card.record.get("error", "failed")])[0]
        return Cell(card.kind, f'<div class="na err" title="{esc(error)}">{esc(card.kind)}: {esc(str(error)[:160])}</div>')
    card.sidecar, mtime = read_sidecar(point.run_dir, card.item_id)
    sidecar = card.sidecar
    output = sidecar.output if sidecar is not None else None
    relpath = output.path if output is not None else card.record.get("output")
    params = sidecar.params if sidecar is not None else {}
    reused = sidecar.reused_from.to_dict() if sidecar is not None and sidecar.reused_from else card.record.get("reused_from")
    note = ""
    if reused:
        source = titles.get(str(reused.get("run_dir")), str(reused.get("run_dir")))
        same = "" if reused.get("id") == card.item_id else f" ({reused.get('id')})"
        note = f'<span class="reused" title="identical key: linked, not generated">= {esc(source)}{esc(same)}</span>'
    if card.kind == "missing" or not relpath:
        return Cell("missing", '<div class="na">video missing</div>', note, params)
    path = point.run_dir / relpath
    shot = poster(point.run_dir, card.item_id, path, mtime)
    poster_attr = f' poster="{url(shot)}"' if shot else ""
    if (output.format if output is not None else path.suffix.lstrip(".")) == "mp4":
        width, height = (output.width, output.height) if output is not None else ("", "")
        media = (
            f'<video data-src="{url(relpath)}" preload="none" muted loop playsinline{poster_attr}'
            f' width="{width}" height="{height}"></video>'
        )
    else:  # gif / webp / frames: the gallery's preview (an image; lazy, so offscreen ones wait)
        media = preview_html(point.run_dir, card, mtime)
    return Cell("done", media, note, params)


def cells_in_parallel(jobs: list[tuple[Point, str, Any]], titles: dict[str, str]) -> list[Cell]:
    """cell_html_at of each (point, rel, card), on a few threads: a new cell's poster is an
    ffmpeg call (~0.1 s), made once per item."""
    from concurrent.futures import ThreadPoolExecutor

    if len(jobs) < 2:
        return [cell_html_at(point, rel, card, titles) for point, rel, card in jobs]
    with ThreadPoolExecutor(POSTER_THREADS, thread_name_prefix="svdbatch-poster") as pool:
        # Not *job: mypy types a lambda's job as Any here, and takes *Any to fill every parameter.
        return list(pool.map(lambda job: cell_html_at(job[0], job[1], job[2], titles), jobs))


@dataclass
class CellSource:
    """What the item column needs of a done cell: its seed and source image, the sidecar's mtime."""

    seed: int | None
    image: tuple[str | None, str | None]
    mtime: float
    from_sidecar: bool = False  # not known yet: read the sidecar


CELL_CACHE = "page-cells.json"  # <point>/cache/: the page's done cells, by sidecar (mtime, size)


CELL_CACHE_VERSION = 1


def _read_cell_cache(path: Path, rel: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CELL_CACHE_VERSION or data.get("rel") != rel:
        return {}
    cells = data.get("cells")
    return cells if isinstance(cells, dict) else {}


def cached_cells(
    points: list[Point], rels: list[str], ids: list[str], titles: dict[str, str]
) -> tuple[list[Cell], dict[tuple[int, str], CellSource]]:
    """The cells of a big sweep's page (row by row, a point per column), and what the item
    column needs. A done cell is kept in <point>/cache/page-cells.json with its sidecar's
    mtime and size: while those and its output are unchanged, the page is rewritten from the
    cache with two stats per cell instead of parsing 25k sidecars (bench/status_scale.py)."""
    width = len(points)
    cells: list[Cell | None] = [None] * (len(ids) * width)
    infos: dict[tuple[int, str], CellSource] = {}
    for k, (point, rel) in enumerate(zip(points, rels, strict=False)):
        cache_file = point.run_dir / CACHE_DIR / CELL_CACHE
        cache = _read_cell_cache(cache_file, rel)
        kept: dict[str, Any] = {}
        layout = layout_version(point.run_dir)
        root = os.fspath(point.run_dir)
        misses: list[tuple[int, str, os.stat_result | None]] = []
        for row, item_id in enumerate(ids):
            try:
                info: os.stat_result | None = os.stat(f"{root}/{sidecar_relpath(item_id, layout)}")
            except OSError:
                info = None
            hit = cache.get(item_id) if info is not None else None
            if (
                info is not None
                and isinstance(hit, dict)
                and hit.get("stamp") == [info.st_mtime_ns, info.st_size]
                and os.path.lexists(f"{root}/{hit.get('output')}")
            ):
                cells[row * width + k] = Cell(**hit["cell"])
                infos[(k, item_id)] = CellSource(hit.get("seed"), tuple(hit.get("image") or (None, None)), info.st_mtime)
                kept[item_id] = hit
            else:
                misses.append((row, item_id, info))
        cards = cards_of(point.run_dir, [item_id for _, item_id, _ in misses]) if misses else {}
        made = cells_in_parallel([(point, rel, cards.get(item_id)) for _, item_id, _ in misses], titles)
        for (row, item_id, info), cell in zip(misses, made, strict=True):
            cells[row * width + k] = cell
            card = cards.get(item_id)
            sidecar = card.sidecar if card is not None else None
            if sidecar is None or info is None:
                continue
            image = (sidecar.image.path, sidecar.image.url)
            infos[(k, item_id)] = CellSource(sidecar.seed, image, info.st_mtime)
            if card is not None and card.kind == "done":
                kept[item_id] = {
                    "stamp": [info.st_mtime_ns, info.st_size],
                    "output": sidecar.output.path,
                    "cell": asdict(cell),
                    "seed": sidecar.seed,
                    "image": list(image),
                }
        if kept != cache:
            try:
                cache_file.parent.mkdir(exist_ok=True)
                body = {"version": CELL_CACHE_VERSION, "rel": rel, "cells": kept}
                atomic_write_bytes(cache_file, json.dumps(body, separators=(",", ":")).encode())
            except OSError as exc:  # a cache: the page is right without it
                log.debug("sweep page: cannot write %s: %s", cache_file, exc)
    return [cell if cell is not None else Cell("pending", '<div class="na">pending</div>') for cell in cells], infos


def cell_html_at(point: Point, rel: str, card: Any, titles: dict[str, str]) -> Cell:
    """cell_html with the point's media paths (relative to the point) made relative to the sweep root."""
    cell = cell_html(point, card, titles)
    prefix = url_prefix(rel)
    cell.media = cell.media.replace('data-src="', f'data-src="{prefix}').replace('poster="', f'poster="{prefix}')
    cell.media = cell.media.replace('<img src="', f'<img src="{prefix}')
    return cell


def url_prefix(rel: str) -> str:

    return url(rel) + "/"
