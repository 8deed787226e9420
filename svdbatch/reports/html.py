"""What the HTML pages (the gallery, the sweep comparison page) share: escaping, URLs of
relative paths, number formatting, and the base stylesheet."""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote


# -- HTML -----------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def url(relative: str) -> str:
    """A relative URL for a run-dir path: ids may hold spaces, '#', '%', '&', unicode."""
    return esc(quote(relative, safe="/"))


def number(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if value else "0"
    return "-" if value is None else str(value)


CSS = """
:root { color-scheme: light; font: 14px/1.35 system-ui, -apple-system, 'Segoe UI', sans-serif; }
body { margin: 0; background: #eef0f3; color: #1d2330; }
header { padding: 14px 20px; background: #1d2330; color: #fff; }
header h1 { margin: 0 0 4px; font-size: 18px; word-break: break-all; }
header p { margin: 0; color: #c8cedb; }
header .bad { color: #ff8a80; font-weight: 600; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; padding: 16px 20px; }
.card { background: #fff; border: 1px solid #d5d9e0; border-radius: 8px; padding: 10px; min-width: 0; }
.card h2 { margin: 8px 0 6px; font-size: 15px; overflow-wrap: anywhere; }
.media { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; align-items: start; }
figure { margin: 0; position: relative; background: #20242c; border-radius: 4px; overflow: hidden; aspect-ratio: 1; }
figure img, figure video { display: block; width: 100%; height: 100%; object-fit: contain; }
figcaption { position: absolute; left: 4px; top: 4px; padding: 0 5px; border-radius: 3px; font-size: 11px;
  background: rgba(0, 0, 0, .55); color: #fff; }
.na { display: flex; align-items: center; justify-content: center; height: 100%; min-height: 80px;
  color: #aab1bf; font-size: 12px; text-align: center; }
.params { display: grid; grid-template-columns: repeat(4, auto); gap: 2px 10px; margin: 0; font-size: 12px; }
.params div { display: flex; gap: 4px; white-space: nowrap; }
.params dt { color: #6b7385; }
.params dd { margin: 0; font-variant-numeric: tabular-nums; }
.card.failed, .card.invalid { border: 2px solid #d32f2f; background: #fff5f5; }
.card.missing { border: 2px dashed #9aa1ae; }
.badge { display: inline-block; margin: 0; padding: 1px 8px; border-radius: 10px; background: #d32f2f; color: #fff;
  font-size: 12px; font-weight: 600; }
.card.invalid .badge { background: #ef6c00; }
.error { margin: 4px 0; color: #b71c1c; font-family: ui-monospace, monospace; font-size: 12px; overflow-wrap: anywhere; }
ul.error { padding-left: 16px; }
details pre { max-height: 220px; overflow: auto; font-size: 11px; background: #fff; padding: 6px; border: 1px solid #f0c4c4; }
.meta, .note { margin: 4px 0 0; color: #6b7385; font-size: 12px; }
.card.dud { border: 2px solid #ef6c00; background: #fffaf3; }
.badge.dud { background: #ef6c00; margin-top: 6px; }
.signals { margin-top: 4px; grid-template-columns: repeat(3, auto); }
.verdict { margin: 4px 0 0; color: #b45300; font-size: 12px; }
"""
