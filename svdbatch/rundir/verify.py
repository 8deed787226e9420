"""`svdbatch verify <run dir> [--json] [--repair]`: check every finished item byte for byte.

Resume trusts an item after two stats (its output and sidecar still have the sizes its
results line recorded). This is the deep check, for a run dir that was copied, synced,
restored or left on a failing disk. For each item with a results line or a sidecar:

    the sidecar is there, parses, says done, and agrees with the latest results line
    (keys, output path, bytes, frames hash, seed, sidecar size)
    the output is there, has the recorded size and sha256,
    and decodes to the recorded frame count and size (PNG frames: to the very frames)

Every damaged item is named with its problems. `--repair` sets each one aside under
<run dir>/damaged/<UTC time>/ (its sidecar and output, moved, never deleted, with a
report.json) and rebuilds metadata.jsonl and the WebDataset shards without it, so the next
run of the same command redoes exactly those items.

It also checks that metadata.jsonl and the WebDataset shards list nothing the run dir does
not hold as finished (dataset.stale_exports); --repair rewrites them.

Exit status: 0 every item is intact, 1 some are damaged (also after --repair) or the dataset
files are stale, 2 not a run dir.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from svdbatch.core.config import OutputConfig, typed
from svdbatch.rundir import records as run_records
from svdbatch.rundir.dataset import stale_exports, write_dataset
from svdbatch.rundir.layout import FLAT, id_from_relpath, layout_version
from svdbatch.rundir.outputs import (
    OutputCheckError,
    check_decodes,
    output_bytes,
    output_key,
    output_settings,
    output_sha256,
    written_fps,
)
from svdbatch.rundir.sidecar import Sidecar, named_output
from svdbatch.rundir.sidecar_fields import SidecarError
from svdbatch.rundir.store import (
    CONFIG,
    DAMAGED_DIR,
    SIDECARS_DIR,
    VIDEOS_DIR,
    RunStore,
    sidecar_relpath,
)

# results.jsonl fields that must equal what the sidecar's own results line says (Sidecar.result_record).
AGREE = ("key", "output_key", "output", "output_bytes", "output_sha256", "frames_sha256", "seed", "meta_sha256")


@dataclass
class ItemReport:
    item_id: str
    problems: list[str] = field(default_factory=list)  # damage: the item must be redone
    notes: list[str] = field(default_factory=list)  # worth knowing, not damage

    @property
    def damaged(self) -> bool:
        return bool(self.problems)


def sidecar_of(run_dir: Path, item_id: str) -> str:
    """The item's sidecar path relative to the run dir, in the run dir's layout."""
    return sidecar_relpath(item_id, layout_version(run_dir))


def read_sidecar(run_dir: Path, item_id: str, report: ItemReport) -> tuple[Sidecar | None, int]:
    """(sidecar, its size); (None, -1) with a problem noted if it is missing or unreadable."""
    try:
        body = (run_dir / sidecar_of(run_dir, item_id)).read_bytes()
    except FileNotFoundError:
        report.problems.append(f"sidecar {sidecar_of(run_dir, item_id)} is missing")
        return None, -1
    except OSError as exc:
        report.problems.append(f"sidecar unreadable: {exc}")
        return None, -1
    try:
        return Sidecar.from_json(body), len(body)
    except SidecarError as exc:
        why = f"does not parse: {exc.problem}" if exc.parse else f"is not an svdbatch item record ({exc.problem})"
        report.problems.append(f"sidecar {why}")
        return None, len(body)


def check_records(item_id: str, sidecar: Sidecar, size: int, record: dict[str, Any] | None, report: ItemReport) -> None:
    """The sidecar is complete in itself and agrees with the item's latest results line."""
    if not sidecar.done or sidecar.id != item_id:
        report.problems.append(f"sidecar is not a done record of {item_id!r} (status {sidecar.status!r}, id {sidecar.id!r})")
    output = sidecar.output
    if not output.sha256 or not sidecar.output_key:
        report.problems.append(
            "the sidecar records no file sha256 / output key (written by an older svdbatch): cannot be verified"
        )
    elif output_key(output.settings) != sidecar.output_key:
        report.problems.append("the sidecar's output key does not match its own output settings")
    if record is None:
        report.notes.append("no results.jsonl line yet (a run stopped before appending it; the next run adds it)")
        return
    expected = sidecar.result_record(size)
    for field_name in AGREE:
        if field_name in record and record[field_name] != expected[field_name]:
            report.problems.append(
                f"results.jsonl and sidecar disagree on {field_name}: {record[field_name]!r} vs {expected[field_name]!r}"
            )
    if "sidecar_bytes" in record and record["sidecar_bytes"] != size:
        report.problems.append(f"sidecar is {size} bytes, results.jsonl recorded {record['sidecar_bytes']}")


def check_output(run_dir: Path, sidecar: Sidecar, report: ItemReport) -> None:
    """The file on disk is the one recorded: size, sha256, and it decodes as recorded."""
    output = sidecar.output
    path = run_dir / output.path
    size = output_bytes(path)
    if size < 0:
        report.problems.append(f"output {output.path} is missing")
        return
    if size != output.bytes:
        report.problems.append(f"output {output.path} is {size} bytes, recorded {output.bytes}")
    digest = output_sha256(path) if output.sha256 else None
    if digest is not None and digest != output.sha256:
        report.problems.append(f"output {output.path} has sha256 {digest}, recorded {output.sha256}")
    lossless = output.format == "frames"
    try:
        check_decodes(
            path, output.frames, output.height, output.width, sidecar.frames_sha256 if lossless else None, fps=output.fps
        )
    except OutputCheckError as exc:
        report.problems.append(str(exc))


def config_output(run_dir: Path) -> OutputConfig | None:
    """The output settings config.yaml states (the latest run's), if readable."""
    try:
        section = (yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}).get("output") or {}
        return typed(OutputConfig, section)
    except Exception:  # no config.yaml (a sharded run), or one from another version: nothing to compare
        return None


def check_against_config(sidecar: Sidecar, stated: OutputConfig | None, report: ItemReport) -> None:
    """config.yaml must not claim settings a video was not written with: say so while a
    re-run with new output settings has not redone every item yet."""
    fps = sidecar.params.get("fps")
    if stated is None or fps is None:
        return
    if output_key(output_settings(stated, written_fps(stated, fps))) != sidecar.output_key:
        report.notes.append(
            f"written with other output settings than config.yaml states ({sidecar.output.settings}); "
            "the next run of that config redoes it"
        )


def check_item(run_dir: Path, item_id: str, record: dict[str, Any] | None, stated: OutputConfig | None = None) -> ItemReport:
    report = ItemReport(item_id)
    if (
        record is not None
        and not os.path.lexists(run_dir / sidecar_of(run_dir, item_id))
        and output_bytes(run_dir / str(record.get("output"))) < 0
    ):
        # Both files removed on purpose (a user forcing a redo, or `--repair`): not done, not damage.
        report.notes.append("not done any more: its sidecar and output were removed; the next run redoes it")
        return report
    sidecar, size = read_sidecar(run_dir, item_id, report)
    if sidecar is None:
        if record is not None and output_bytes(run_dir / str(record.get("output"))) >= 0:
            report.notes.append(f"its output {record.get('output')} is still there")
        return report
    check_records(item_id, sidecar, size, record, report)
    check_output(run_dir, sidecar, report)
    check_against_config(sidecar, stated, report)
    return report


def sidecar_ids(run_dir: Path) -> list[str]:
    items = run_dir / SIDECARS_DIR
    if not items.is_dir():
        return []
    layout = layout_version(run_dir)
    return [id_from_relpath(p.relative_to(items).as_posix(), layout) for p in items.rglob("*.json") if not p.name.startswith(".")]


def unrecorded_outputs(run_dir: Path) -> list[str]:
    """Files in videos/ that no sidecar names: left by other output settings (a redo in
    another format writes a new file and leaves the old one), never listed as done."""
    videos = run_dir / VIDEOS_DIR
    if not videos.is_dir():
        return []
    named = set()
    for item_id in sidecar_ids(run_dir):
        named.add(named_output(run_dir / sidecar_of(run_dir, item_id)))
    # Outputs lie in videos/ (layout 1) or one level down, in its bucket folders (layout 2).
    folders = [videos] if layout_version(run_dir) == FLAT else [p for p in videos.iterdir() if p.is_dir()]
    found = [p for folder in folders for p in folder.iterdir() if not p.name.startswith(".")]
    return sorted(name for p in found if (name := p.relative_to(run_dir).as_posix()) not in named)


def verify_run_dir(run_dir: Path) -> list[ItemReport]:
    """One report per item that has a results line or a sidecar, by id."""
    records = run_records.latest_results(run_dir)
    ids = sorted(set(records) | set(sidecar_ids(run_dir)))
    stated = config_output(run_dir)
    return [check_item(run_dir, item_id, records.get(item_id), stated) for item_id in ids]


# -- repair -----------------------------------------------------------------------------
def set_aside(run_dir: Path, damaged: list[ItemReport]) -> tuple[Path, list[str]]:
    """Move each damaged item's sidecar and output under damaged/<time>/ (same relative
    paths), so the next run redoes it. Returns the folder and the ids left alone because
    another process holds their claim (it is redoing them right now)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = run_dir / DAMAGED_DIR / stamp
    store = RunStore(run_dir, "mp4")  # the format is not used: paths come from the records
    records = run_records.latest_results(run_dir)
    busy = []
    for report in damaged:
        claim = store.claim(report.item_id)
        if claim is None:
            busy.append(report.item_id)
            continue
        try:
            for relative in item_files(run_dir, report.item_id, records.get(report.item_id)):
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(run_dir / relative), str(target))
            record = records.get(report.item_id)
            if record is not None and not record.get("removed"):
                store.record_removed(report.item_id)  # the summaries count it out of done
        finally:
            store.release(claim)
    dest.mkdir(parents=True, exist_ok=True)
    moved = [asdict(r) for r in damaged if r.item_id not in busy]
    (dest / "report.json").write_text(json.dumps({"set_aside": moved, "busy": busy}, indent=1) + "\n")
    write_dataset(store)  # the dataset files must not list what was moved
    return dest, busy


def item_files(run_dir: Path, item_id: str, record: dict[str, Any] | None) -> list[str]:
    """The item's sidecar and every output path its sidecar or results line names, that exist."""
    sidecar = sidecar_of(run_dir, item_id)
    names: list[object] = [sidecar, named_output(run_dir / sidecar)]  # JSON values too: only safe paths are kept below
    if record and record.get("output"):
        names.append(record["output"])
    safe = [n for n in dict.fromkeys(names) if isinstance(n, str) and not os.path.isabs(n) and ".." not in Path(n).parts]
    return [n for n in safe if os.path.lexists(run_dir / n)]


def check_exports(run_dir: Path, repair: bool) -> tuple[list[str], list[str]]:
    """(what the dataset files list that is not finished, what --repair found and rewrote)."""
    store = RunStore(run_dir, "mp4")  # the format is not used: paths come from the records
    stale = stale_exports(store)
    if not (stale and repair):
        return stale, []
    write_dataset(store)
    return stale_exports(store), stale


# -- command ----------------------------------------------------------------------------
