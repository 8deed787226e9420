"""Run-dir layouts (rundir/layout.py): a new run dir groups items in bucket folders; a run dir
written by an older svdbatch (flat videos/<id>.mp4 and items/<id>.json, one shared
results.jsonl and failures.jsonl) is read and resumed as it is: status, verify, gallery,
open_run, the dataset files and reproduce's file check work on both."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import svdbatch
from svdbatch import run
from svdbatch.engine.reproduce import check_file_on_disk
from svdbatch.reports.gallery import write_gallery
from svdbatch.rundir import layout, records
from svdbatch.rundir.layout import BUCKET_CHARS, FLAT, GROUPED, LAYOUT_FILE, bucket, forget_layouts, layout_version
from svdbatch.rundir.sidecar import Sidecar

from .conftest import make_cfg, run_cli, write_csv


def to_old_layout(run_dir: Path) -> None:
    """Rewrite a run dir as svdbatch wrote it before layouts: flat files, sidecars naming
    flat outputs, one results.jsonl with the lines those sidecars make, no records/."""
    lines = []
    for sidecar_path in sorted((run_dir / "items").glob("*/*.json")):
        sidecar = Sidecar.read(sidecar_path)
        old_video = run_dir / "videos" / Path(sidecar.output.path).name
        (run_dir / sidecar.output.path).rename(old_video)
        sidecar = replace(sidecar, output=replace(sidecar.output, path=old_video.relative_to(run_dir).as_posix()))
        body = sidecar.to_json()
        (run_dir / "items" / f"{sidecar.id}.json").write_bytes(body)
        sidecar_path.unlink()
        lines.append(sidecar.result_record(len(body)))
    for folder in [*(run_dir / "items").iterdir(), *(run_dir / "videos").iterdir()]:
        if folder.is_dir() and len(folder.name) == BUCKET_CHARS:
            folder.rmdir()
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    (run_dir / "failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.read_failures(run_dir)))
    shutil.rmtree(run_dir / "records")
    (run_dir / LAYOUT_FILE).unlink()
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    forget_layouts()  # this process learnt the new layout of this path


def test_a_new_run_dir_groups_items_by_a_stable_bucket(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2]])
    run_dir = tmp_path / "run"
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}")).done == 2
    assert layout_version(run_dir) == GROUPED and bucket("a") == "86f"  # sha1("a"): never changes
    assert (run_dir / "items" / "86f" / "a.json").is_file() and (run_dir / "videos" / "86f" / "a.mp4").is_file()
    assert not list((run_dir / "claims").iterdir())  # released claims are deleted
    assert not (run_dir / "results.jsonl").exists() and list((run_dir / "records").glob("*.results.jsonl"))


def test_an_old_flat_run_dir_is_read_and_resumed_as_it_is(tmp_path, images):
    rows = [["a", "img/a.png", 1], ["b", "img/b.png", 2], ["c", "img/missing.png", 3]]
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "run.strict=false")
    first = run(cfg)
    assert (first.done, first.failed + first.invalid) == (2, 1)
    to_old_layout(run_dir)
    assert (run_dir / "items" / "a.json").is_file() and (run_dir / "videos" / "a.mp4").is_file()
    assert layout_version(run_dir) == FLAT

    report = svdbatch.status(run_dir)
    assert report["counts"]["done"] == 2 and report["counts"]["total"] == 3
    checked = svdbatch.verify(run_dir)
    assert not checked.damaged and len(checked.items) == 2 and checked.unrecorded_outputs == []
    done = [item for item in svdbatch.open_run(run_dir) if item.status == "done"]
    assert sorted(i.id for i in done) == ["a", "b"] and done[0].video is not None and done[0].video.is_file()
    text = write_gallery(run_dir).read_text(encoding="utf-8")
    assert 'src="videos/a.mp4"' in text
    sidecar_path = run_dir / "items" / "a.json"
    assert check_file_on_disk(sidecar_path, Sidecar.read(sidecar_path))[0] is True  # what reproduce checks

    # Resumed: nothing redone, the layout kept (a new item goes where the old ones are).
    write_csv(manifest, ["id", "image", "seed"], [*rows[:2], ["d", "img/d.png", 4]])
    again = run(cfg)
    assert (again.done, again.skipped) == (1, 2)
    assert json.loads((run_dir / LAYOUT_FILE).read_text())["version"] == FLAT
    assert (run_dir / "videos" / "d.mp4").is_file() and (run_dir / "items" / "d.json").is_file()
    metadata = [json.loads(line) for line in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert sorted(row["file_name"] for row in metadata) == ["videos/a.mp4", "videos/b.mp4", "videos/d.mp4"]
    assert svdbatch.status(run_dir)["counts"]["done"] == 3
    final = run_cli("verify", str(run_dir))
    assert final.returncode == 0 and "3 intact, 0 damaged" in final.stdout, final.stdout + final.stderr
    assert Path(run_dir / "results.jsonl").read_text().count("\n") == 2  # the old log is never written again


def test_a_run_dir_prepared_while_its_layout_is_being_looked_up_is_grouped(tmp_path, monkeypatch):
    """A worker that starts while the driver prepares a new run dir must not take it for an
    old flat one: the driver writes layout.json, then items/, between the worker's look for
    the file and its look for the folders (the race seen once under load in CI)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_lexists = layout.os.path.lexists

    def prepared_meanwhile(path):  # the driver's prepare lands after the file was looked for
        if not (run_dir / LAYOUT_FILE).exists():
            layout.write_layout(run_dir, GROUPED)
            (run_dir / "items").mkdir()
        return real_lexists(path)

    monkeypatch.setattr(layout.os.path, "lexists", prepared_meanwhile)
    forget_layouts()
    assert layout_version(run_dir) == GROUPED
