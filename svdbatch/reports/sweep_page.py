"""The sweep comparison page (<sweep root>/index.html): one column per point, one row per
item, each cell the point's video of that item, with each point's quality summary.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.reports import status
from svdbatch.reports.gallery import (
    THUMB_PX,
    cards_of,
    collect_cards,
    fresh,
    jpeg_bytes,
    preview_html,
    read_sidecar,
    source_thumbnail,
)
from svdbatch.reports.html import CSS, esc, number, url
from svdbatch.reports.status import read_manifest_view
from svdbatch.reports.sweep_root import Point, read_sweep_spec, sweep_points, unstarted_points
from svdbatch.rundir import records
from svdbatch.rundir.layout import asset_relpath, layout_version, make_parents, sidecar_relpath
from svdbatch.rundir.store import CACHE_DIR

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


# -- the comparison page ------------------------------------------------------------------
PAGE = "index.html"


PAGE_BESIDE_RUN = "sweep.html"  # when the sweep root is also a plain run's dir, whose index.html is its contact sheet


def page_path(root: Path) -> Path:
    root = Path(root)
    return root / (PAGE_BESIDE_RUN if records.has_records(root) else PAGE)


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


def manifest_order(points: list[Point]) -> list[str] | None:
    """The ids of the first point whose manifest can be read, in its order."""
    for point in points:
        view = read_manifest_view(point.run_dir)
        if view.known:
            return list(view.ids)
    return None


def big_run(run_dir: Path) -> bool:
    """A run dir with so many results that reading them all would cost the page seconds."""
    return records.totals(run_dir).commits >= status.FAST_FROM


def item_order(points: list[Point], cards: list[dict[str, Any]], manifest_ids: list[str] | None = None) -> list[str]:
    """Manifest order (from the first point whose manifest can be read), then any other id."""

    ids = list(manifest_ids) if manifest_ids is not None else manifest_order(points) or []
    known = set(ids)
    extra = sorted({item_id for by_id in cards for item_id in by_id} - known)
    return ids + extra


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


SWEEP_CSS = """
main { display: block; padding: 0; }
.wrap { overflow: auto; max-height: calc(100vh - 64px); }
table { border-collapse: separate; border-spacing: 0; font-size: 12px; }
th, td { border-right: 1px solid #d5d9e0; border-bottom: 1px solid #d5d9e0; padding: 4px; vertical-align: top; background: #fff; }
thead th { position: sticky; top: 0; z-index: 2; background: #f6f7f9; text-align: left; min-width: 180px; max-width: 260px; }
thead th .k { color: #6b7385; font-weight: 400; }
th.item, td.item { position: sticky; left: 0; z-index: 1; background: #f6f7f9; width: 150px; max-width: 150px; }
thead th.item { z-index: 3; }
td.item h2 { margin: 2px 0; font-size: 13px; overflow-wrap: anywhere; }
td.item img { width: 100%; border-radius: 3px; background: #20242c; }
td.cell video, td.cell img { display: block; width: 220px; max-width: 220px; height: auto; aspect-ratio: attr(width) / attr(height);
  background: #20242c; border-radius: 3px; cursor: pointer; }
td.cell .na { width: 220px; min-height: 60px; }
td.failed, td.invalid { background: #fff5f5; outline: 2px solid #d32f2f; outline-offset: -2px; }
.na.err { color: #b71c1c; font-family: ui-monospace, monospace; font-size: 11px; overflow-wrap: anywhere; padding: 4px; }
td.pending .na { color: #aab1bf; }
.p { color: #6b7385; margin-top: 2px; font-variant-numeric: tabular-nums; }
.reused { display: inline-block; margin-top: 2px; padding: 0 6px; border-radius: 8px; background: #e3ecfa; color: #1a4c9c; }
.varies { color: #1d2330; font-weight: 600; }
header button { margin-left: 12px; }
tr.quality td { font-variant-numeric: tabular-nums; background: #fbfbfc; }
tr.quality .k { color: #6b7385; }
tr.quality .rate { font-weight: 600; }
tr.quality .rate.bad { color: #b71c1c; }
"""


SWEEP_JS = """
// Videos load and play only while on screen (preload="none" until then): a sweep page
// may hold hundreds of cells. Click a video to pause or play it.
const seen = new IntersectionObserver(entries => entries.forEach(({target: video, isIntersecting}) => {
  if (isIntersecting) {
    if (!video.getAttribute('src')) video.src = video.dataset.src;
    if (!video.dataset.paused) video.play().catch(() => {});
  } else if (!video.paused) {
    video.pause();
  }
}), {rootMargin: '150px'});
document.querySelectorAll('video[data-src]').forEach(video => {
  seen.observe(video);
  video.addEventListener('click', () => {
    if (video.paused) { delete video.dataset.paused; video.play().catch(() => {}); }
    else { video.dataset.paused = '1'; video.pause(); }
  });
});
// Restart every playing video at frame 0 together, to compare a row in step.
document.getElementById('sync').addEventListener('click', () =>
  document.querySelectorAll('video[src]').forEach(video => { video.currentTime = 0; }));
"""


PARAM_LABELS = (
    ("motion_bucket_id", "motion"),
    ("noise_aug_strength", "aug"),
    ("fps", "fps"),
    ("num_frames", "frames"),
    ("num_inference_steps", "steps"),
    ("min_guidance_scale", "cfg min"),
    ("max_guidance_scale", "cfg max"),
)


def params_line(params: dict[str, Any], varies: set[str]) -> str:

    parts = []
    for name, label in PARAM_LABELS:
        if name in params:
            value = number(params[name], 4) if isinstance(params[name], float) else params[name]
            text = f"{esc(label)} {esc(value)}"
            parts.append(f'<span class="varies">{text}</span>' if name in varies else text)
    return f'<div class="p">{" · ".join(parts)}</div>' if parts else ""


def header_cell(point: Point, rel: str) -> str:

    lines = "".join(f'<div><span class="k">{esc(k.rsplit(".", 1)[-1])}=</span>{esc(v)}</div>' for k, v in point.label.items())
    title = esc(point.title)
    return f'<th title="{title}"><a href="{url(rel)}/index.html">{lines or esc(point.run_dir.name)}</a></th>'


def write_sweep_page(root: Path, max_items: int = 500) -> Path:
    """Rewrite <sweep root>/index.html: one row per item, one column per point; the first
    `max_items` items in manifest order (0 = all: every cell costs a poster once)."""
    from datetime import datetime, timezone

    root = Path(root)
    spec = read_sweep_spec(root)
    points = sweep_points(root, spec)
    manifest_ids = manifest_order(points)
    rels = [p.run_dir.relative_to(root).as_posix() for p in points]
    titles = {str(p.run_dir.resolve()): p.short_title for p in points}
    big = manifest_ids is not None and max_items > 0 and any(big_run(p.run_dir) for p in points)
    infos: dict[tuple[int, str], CellSource] = {}
    if big and manifest_ids is not None:
        # A big sweep: only the shown items, each cell from the point's cell cache while its
        # sidecar is unchanged, else from its sidecar (gallery.cards_of): no results records read.
        all_ids = manifest_ids
        ids = all_ids[:max_items]
        all_cells, infos = cached_cells(points, rels, ids, titles)
    else:
        by_point = [
            {c.item_id: c for c in collect_cards(p.run_dir) if c.kind != "invalid" or c.record.get("id") is not None}
            for p in points
        ]
        all_ids = item_order(points, by_point, manifest_ids)
        ids = all_ids if max_items <= 0 else all_ids[:max_items]
        jobs = [(p, rel, by_id.get(item_id)) for item_id in ids for p, rel, by_id in zip(points, rels, by_point, strict=False)]
        all_cells = cells_in_parallel(jobs, titles)
        for k, by_id in enumerate(by_point):
            for item_id, card in by_id.items():
                if card.kind in ("done", "missing"):
                    infos[(k, item_id)] = CellSource(None, (None, None), 0.0, from_sidecar=True)
    rows = []
    counts = {"done": 0, "reused": 0, "failed": 0, "pending": 0, "duds": 0}
    for row, item_id in enumerate(ids):
        cells = all_cells[row * len(points) : (row + 1) * len(points)]
        values: dict[str, set] = {}
        for cell in cells:
            for name, value in cell.params.items():
                values.setdefault(name, set()).add(json.dumps(value))
        varies = {name for name, seen in values.items() if len(seen) > 1}
        thumb_html, seed = '<div class="na">no source</div>', None
        for k, (point, rel) in enumerate(zip(points, rels, strict=False)):
            source = infos.get((k, item_id))
            if source is not None:
                seed, image, mtime = source.seed, source.image, source.mtime
                if source.from_sidecar:
                    sidecar, mtime = read_sidecar(point.run_dir, item_id)
                    seed = sidecar.seed if sidecar is not None else None
                    image = (sidecar.image.path, sidecar.image.url) if sidecar is not None else (None, None)
                thumb = source_thumbnail(point.run_dir, item_id, image, mtime)
                if thumb:
                    thumb_html = f'<img src="{url(rel + "/" + thumb)}" alt="source" loading="lazy">'
                    break
        head = f'<td class="item"><h2 title="{esc(item_id)}">{esc(item_id)}</h2>{thumb_html}'
        head += f'<div class="p">seed {esc(seed)}</div></td>' if seed is not None else "</td>"
        body = ""
        for cell in cells:
            counts[
                "reused"
                if cell.note
                else (
                    "done"
                    if cell.kind in ("done", "missing")
                    else ("failed" if cell.kind in ("failed", "invalid") else "pending")
                )
            ] += 1
            body += f'<td class="cell {cell.kind}">{cell.media}{params_line(cell.params, varies)}{cell.note}</td>'
        rows.append(f"<tr>{head}{body}</tr>")
    unstarted = unstarted_points(spec, points)
    shown = f" (showing the first {len(ids)})" if len(ids) < len(all_ids) else ""
    summary = [
        f"{len(points)} points",
        f"{len(all_ids)} items{shown}",
        f"{counts['done']} generated",
        f"{counts['reused']} reused",
    ]
    qualities = [point_quality(p.run_dir) for p in points]
    counts["duds"] = sum(q["duds"] for q in qualities)
    if counts["duds"]:
        summary.append(f'<span class="bad">{counts["duds"]} duds</span>')
    if counts["failed"]:
        summary.append(f'<span class="bad">{counts["failed"]} failed</span>')
    if counts["pending"]:
        summary.append(f"{counts['pending']} pending")
    if unstarted:
        summary.append(f"{len(unstarted)} points not started")
    summary.append(f"updated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC")
    title = esc(root.resolve().name)
    headers = "".join(header_cell(p, rel) for p, rel in zip(points, rels, strict=False))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title} · sweep · svdbatch</title><style>{CSS}{SWEEP_CSS}</style></head><body>"
        f"<header><h1>{title} <small>sweep</small></h1><p>{' · '.join(summary)}"
        '<button id="sync" type="button">restart visible videos together</button></p></header>'
        f'<main><div class="wrap"><table><thead><tr><th class="item">item</th>{headers}</tr>'
        f"{quality_row(qualities)}</thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div></main><script>{SWEEP_JS}</script></body></html>\n"
    )
    target = page_path(root)
    atomic_write_bytes(target, page.encode("utf-8"))
    return target


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


def point_quality(run_dir: Path, totals: records.RunTotals | None = None) -> dict[str, Any]:
    """status.quality_summary of a point's finished items (the writers' summaries keep the sums)."""
    return status.quality_summary(totals or records.totals(run_dir))


def quality_row(qualities: list[dict[str, Any]]) -> str:
    """The page's row under the point headers: each point's dud rate and every signal's
    mean ± spread (standard deviation) over its finished items: what a motion_bucket_id
    sweep is for. Empty when no point has signals (items made before svdbatch measured them)."""
    if not any(q["items"] for q in qualities):
        return ""
    cells = []
    for q in qualities:
        if not q["items"]:
            cells.append('<td class="quality"><div class="p">no signals</div></td>')
            continue
        rate = f"{100 * q['dud_rate']:.0f}% duds ({q['duds']}/{q['items']})"
        lines = "".join(
            f'<div><span class="k">{esc(name)}</span> {number(v["mean"], 3)} ± {number(v["sd"], 3)}</div>'
            for name, v in q["signals"].items()
        )
        bad = " bad" if q["duds"] else ""
        cells.append(f'<td class="quality"><div class="rate{bad}">{esc(rate)}</div>{lines}</td>')
    title = "quality: dud rate, signal mean ± sd (docs/quality.md)"
    # Cells, not headers: the row scrolls away under the sticky point headers.
    return f'<tr class="quality"><td class="item" title="{esc(title)}">quality<div class="p">mean ± sd</div></td>{"".join(cells)}</tr>'


def cell_html_at(point: Point, rel: str, card: Any, titles: dict[str, str]) -> Cell:
    """cell_html with the point's media paths (relative to the point) made relative to the sweep root."""
    cell = cell_html(point, card, titles)
    prefix = url_prefix(rel)
    cell.media = cell.media.replace('data-src="', f'data-src="{prefix}').replace('poster="', f'poster="{prefix}')
    cell.media = cell.media.replace('<img src="', f'<img src="{prefix}')
    return cell


def url_prefix(rel: str) -> str:

    return url(rel) + "/"


def update_sweep_page(root: Path, max_items: int = 500) -> Path | None:
    """write_sweep_page, logged not raised: a page problem must not fail a sweep point."""
    try:
        target = write_sweep_page(root, max_items)
        log.info("sweep page: %s", target)
        return target
    except Exception as exc:
        log.warning("sweep page: could not write %s: %s", page_path(root), exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return None
