"""The sweep comparison page (<sweep root>/index.html): one column per point, one row per
item, each cell the point's video of that item, with each point's quality summary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.reports import status
from svdbatch.reports.cards import collect_cards, read_sidecar, source_thumbnail
from svdbatch.reports.html import CSS, esc, number, url
from svdbatch.reports.status import read_manifest_view
from svdbatch.reports.sweep_cells import Cell, CellSource, cached_cells, cells_in_parallel
from svdbatch.reports.sweep_root import Point, read_sweep_spec, sweep_points, unstarted_points
from svdbatch.rundir import records, summaries

log = logging.getLogger(__name__)


# -- the comparison page ------------------------------------------------------------------
PAGE = "index.html"


PAGE_BESIDE_RUN = "sweep.html"  # when the sweep root is also a plain run's dir, whose index.html is its contact sheet


def page_path(root: Path) -> Path:
    root = Path(root)
    return root / (PAGE_BESIDE_RUN if records.has_records(root) else PAGE)


def manifest_order(points: list[Point]) -> list[str] | None:
    """The ids of the first point whose manifest can be read, in its order."""
    for point in points:
        view = read_manifest_view(point.run_dir)
        if view.known:
            return list(view.ids)
    return None


def big_run(run_dir: Path) -> bool:
    """A run dir with so many results that reading them all would cost the page seconds."""
    return summaries.totals(run_dir).commits >= status.FAST_FROM


def item_order(points: list[Point], cards: list[dict[str, Any]], manifest_ids: list[str] | None = None) -> list[str]:
    """Manifest order (from the first point whose manifest can be read), then any other id."""

    ids = list(manifest_ids) if manifest_ids is not None else manifest_order(points) or []
    known = set(ids)
    extra = sorted({item_id for by_id in cards for item_id in by_id} - known)
    return ids + extra


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
    root = Path(root)
    spec = read_sweep_spec(root)
    points = sweep_points(root, spec)
    rels = [p.run_dir.relative_to(root).as_posix() for p in points]
    all_ids, ids, all_cells, infos = page_cells(points, rels, max_items)
    counts = {"done": 0, "reused": 0, "failed": 0, "pending": 0, "duds": 0}
    rows = []
    for row, item_id in enumerate(ids):
        cells = all_cells[row * len(points) : (row + 1) * len(points)]
        rows.append(item_row(points, rels, item_id, cells, infos, counts))
    qualities = [point_quality(p.run_dir) for p in points]
    counts["duds"] = sum(q["duds"] for q in qualities)
    summary = summary_line(len(points), len(all_ids), len(ids), counts, len(unstarted_points(spec, points)))
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


def page_cells(
    points: list[Point], rels: list[str], max_items: int
) -> tuple[list[str], list[str], list[Cell], dict[tuple[int, str], CellSource]]:
    """(every item id, the ids shown, their cells row by row, what the item column needs).
    A big sweep reads only the shown items' cells (cached_cells); a small one every card."""
    manifest_ids = manifest_order(points)
    titles = {str(p.run_dir.resolve()): p.short_title for p in points}
    big = manifest_ids is not None and max_items > 0 and any(big_run(p.run_dir) for p in points)
    infos: dict[tuple[int, str], CellSource] = {}
    if big and manifest_ids is not None:
        # A big sweep: only the shown items, each cell from the point's cell cache while its
        # sidecar is unchanged, else from its sidecar (cards.cards_of): no results records read.
        all_ids = manifest_ids
        ids = all_ids[:max_items]
        all_cells, infos = cached_cells(points, rels, ids, titles)
        return all_ids, ids, all_cells, infos
    by_point = [
        {c.item_id: c for c in collect_cards(p.run_dir) if c.kind != "invalid" or c.record.get("id") is not None} for p in points
    ]
    all_ids = item_order(points, by_point, manifest_ids)
    ids = all_ids if max_items <= 0 else all_ids[:max_items]
    jobs = [(p, rel, by_id.get(item_id)) for item_id in ids for p, rel, by_id in zip(points, rels, by_point, strict=False)]
    all_cells = cells_in_parallel(jobs, titles)
    for k, by_id in enumerate(by_point):
        for item_id, card in by_id.items():
            if card.kind in ("done", "missing"):
                infos[(k, item_id)] = CellSource(None, (None, None), 0.0, from_sidecar=True)
    return all_ids, ids, all_cells, infos


def item_row(
    points: list[Point],
    rels: list[str],
    item_id: str,
    cells: list[Cell],
    infos: dict[tuple[int, str], CellSource],
    counts: dict[str, int],
) -> str:
    """One item's row: its source image and seed, then its cell of each point (counted in
    `counts`); a parameter is shown in a cell only where the points differ in it."""
    values: dict[str, set] = {}
    for cell in cells:
        for name, value in cell.params.items():
            values.setdefault(name, set()).add(json.dumps(value))
    varies = {name for name, seen in values.items() if len(seen) > 1}
    thumb_html, seed = source_column(points, rels, item_id, infos)
    head = f'<td class="item"><h2 title="{esc(item_id)}">{esc(item_id)}</h2>{thumb_html}'
    head += f'<div class="p">seed {esc(seed)}</div></td>' if seed is not None else "</td>"
    body = ""
    for cell in cells:
        counts[
            "reused"
            if cell.note
            else ("done" if cell.kind in ("done", "missing") else ("failed" if cell.kind in ("failed", "invalid") else "pending"))
        ] += 1
        body += f'<td class="cell {cell.kind}">{cell.media}{params_line(cell.params, varies)}{cell.note}</td>'
    return f"<tr>{head}{body}</tr>"


def source_column(
    points: list[Point], rels: list[str], item_id: str, infos: dict[tuple[int, str], CellSource]
) -> tuple[str, int | None]:
    """The item column's source thumbnail (HTML) and seed, from the first point that has them."""
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
    return thumb_html, seed


def summary_line(points: int, items: int, shown_items: int, counts: dict[str, int], unstarted: int) -> list[str]:
    """The header's summary: points, items, generated, reused, duds, failed, pending, when."""
    from datetime import datetime, timezone

    shown = f" (showing the first {shown_items})" if shown_items < items else ""
    summary = [
        f"{points} points",
        f"{items} items{shown}",
        f"{counts['done']} generated",
        f"{counts['reused']} reused",
    ]
    if counts["duds"]:
        summary.append(f'<span class="bad">{counts["duds"]} duds</span>')
    if counts["failed"]:
        summary.append(f'<span class="bad">{counts["failed"]} failed</span>')
    if counts["pending"]:
        summary.append(f"{counts['pending']} pending")
    if unstarted:
        summary.append(f"{unstarted} points not started")
    summary.append(f"updated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC")
    return summary


def point_quality(run_dir: Path, totals: summaries.RunTotals | None = None) -> dict[str, Any]:
    """status.quality_summary of a point's finished items (the writers' summaries keep the sums)."""
    return status.quality_summary(totals or summaries.totals(run_dir))


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


def update_sweep_page(root: Path, max_items: int = 500) -> Path | None:
    """write_sweep_page, logged not raised: a page problem must not fail a sweep point."""
    try:
        target = write_sweep_page(root, max_items)
        log.info("sweep page: %s", target)
        return target
    except Exception as exc:
        log.warning("sweep page: could not write %s: %s", page_path(root), exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return None
