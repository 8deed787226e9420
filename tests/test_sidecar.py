"""The item sidecar as one typed record (svdbatch/sidecar.py): what a run writes reads back
byte for byte, results lines are derived from it, and a truncated, foreign or older record
is refused with the file and the field named, while verify, the gallery and resume cope."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from svdbatch import run
from svdbatch.core.jsonl import latest_by_id
from svdbatch.core.quality import SIGNALS
from svdbatch.reports.gallery import write_gallery
from svdbatch.rundir import records
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarError
from svdbatch.rundir.store import RunStore
from svdbatch.rundir.verify import check_item, item_files
from tests.conftest import make_cfg, make_image, write_csv

from .runfiles import results_of, sidecar_file, sidecar_rel, video_file, video_rel


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cache) -> tuple[Path, Path, Path]:
    """A run of two items (meta data, a derived seed, a per-row override), a second run dir
    that reuses both (reused_from, the source's timings nested), and one of PNG frames."""
    root = tmp_path_factory.mktemp("sidecar")
    for n, name in enumerate("ab"):
        make_image(root / "img" / f"{name}.png", seed=n)
    manifest = write_csv(
        root / "m.csv",
        ["id", "image", "seed", "motion_bucket_id", "meta_caption"],
        [["a", "img/a.png", 1, None, "a cat"], ["b", "img/b.png", None, 30, "ünï"]],
    )
    first, again = root / "first", root / "again"
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={first}")).done == 2
    summary = run(make_cfg(f"manifest={manifest}", f"run.dir={again}", f"run.reuse_from=[{first}]"))
    assert (summary.done, summary.reused) == (0, 2)
    frames = root / "frames"
    assert (
        run(make_cfg(f"manifest={manifest}", f"run.dir={frames}", "output=frames", "conditioning.resize=pad", "run.limit=1")).done
        == 1
    )
    return first, again, frames


# The on-disk format, pinned: what readers outside svdbatch (and older run dirs) rely on.
TOP = {
    "schema",
    "status",
    "id",
    "key",
    "output_key",
    "seed",
    "row",
    "image",
    "preprocess",
    "params",
    "memory",
    "oom_fallback",
    "output",
    "frames_sha256",
    "timings",
    "finished_at",
    "config",
    "model",
    "device",
    "device_name",
    "num_threads",
    "compiled",
    "versions",
    "quality",  # docs/quality.md: written for every generated item since signals are measured
}
NESTED = {
    "row": {"manifest", "line", "id", "image", "seed", "seed_derived", "overrides", "resize", "meta"},
    "image": {"path", "url", "sha256", "bytes", "mtime_ns", "size"},
    "output": {"path", "format", "fps", "settings", "bytes", "sha256", "encoder", "frames", "height", "width"},
    "quality": {"attempts", "kept", "dud", "rules"},
}
ATTEMPT = {"attempt", "seed", "signals", "verdict", "precision"}


def test_the_files_keep_the_format_they_always_had(runs):
    first, again, _ = runs
    for path in [*first.glob("items/*/*.json"), *again.glob("items/*/*.json")]:
        body = path.read_bytes()
        record = json.loads(body)
        assert body == json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
        reused = path.is_relative_to(again)
        assert set(record) == TOP | ({"reused_from"} if reused else set())
        for name, keys in NESTED.items():
            assert set(record[name]) == keys, name
        assert [set(a) for a in record["quality"]["attempts"]] == [ATTEMPT]  # quality off: one attempt, never a dud
        assert set(record["quality"]["attempts"][0]["signals"]) == set(SIGNALS) and record["quality"]["dud"] is False
        timings = {"reuse_s", "total_s", "source"} if reused else {"load_image_s", "generate_s", "write_s", "total_s"}
        assert set(record["timings"]) == timings
        assert set(record.get("reused_from") or {"run_dir": 1, "id": 1, "how": 1}) == {"run_dir", "id", "how"}


def test_every_sidecar_a_run_writes_reads_back_byte_identical_and_makes_its_results_line(runs):
    first, again, frames = runs
    for run_dir in runs:
        lines = latest_by_id(results_of(run_dir))
        paths = sorted((run_dir / "items").glob("*/*.json"), key=lambda p: p.stem)
        assert [p.stem for p in paths] == (["a"] if run_dir == frames else ["a", "b"])
        for path in paths:
            body = path.read_bytes()
            sidecar = Sidecar.read(path)
            assert sidecar.to_json() == body
            assert Sidecar.from_json(body.decode()) == sidecar
            line = {k: v for k, v in lines[sidecar.id].items() if k != records.ORDER_FIELD}  # the writer stamps when
            assert sidecar.result_record(len(body)) == line
    made, reused = Sidecar.read(sidecar_file(first, "a")), Sidecar.read(sidecar_file(again, "a"))
    assert made.reused_from is None and made.timings.generate_s is not None and made.image.size == (80, 64)
    assert reused.reused_from.run_dir == str(first.resolve()) and reused.reused_from.id == "a"
    assert reused.timings.source == made.timings and reused.timings.reuse_s == reused.timings.total_s
    assert reused.frames_sha256 == made.frames_sha256 and reused.output.path == video_rel(again, "a")
    assert reused.row.meta == {"meta_caption": "a cat"} and reused.image.size == made.image.size
    assert Sidecar.read(sidecar_file(first, "b")).row.seed_derived is True
    assert Sidecar.read(sidecar_file(frames, "a")).output.format == "frames"
    # Optional fields round-trip too, and are written only when set.
    warmed = replace(made, warmup_s=1.5)
    assert Sidecar.from_json(warmed.to_json()) == warmed and b'"warmup_s": 1.5' in warmed.to_json()
    assert b"warmup_s" not in made.to_json() and b"reused_from" not in made.to_json()


def _edited(record: dict, edit) -> dict:
    record = json.loads(json.dumps(record))
    edit(record)
    return record


BAD = [
    ("empty", lambda r: r.clear(), "no schema or output field"),
    ("foreign", lambda r: [r.pop(k) for k in list(r) if k != "id"], "no schema or output field"),
    ("older schema", lambda r: r.update(schema=0), "schema 0; this svdbatch reads schema 1"),
    ("missing", lambda r: r["row"].pop("line"), "field 'row.line' is missing"),
    ("mistyped", lambda r: r.update(seed="1"), "field 'seed' is str '1', expected int"),
    ("bool for int", lambda r: r.update(num_threads=True), "field 'num_threads' is bool"),
    ("size", lambda r: r["image"].update(size=[80]), "field 'image.size' is [80], expected [width, height]"),
    ("nested", lambda r: r["timings"].update(source={"reuse_s": 1.0}), "field 'timings.source.total_s' is missing"),
    ("not an object", lambda r: r.update(output=[]), "field 'output' is list [], expected dict"),
]


@pytest.mark.parametrize("name, edit, message", BAD, ids=[b[0] for b in BAD])
def test_a_foreign_or_older_record_is_refused_naming_the_file_and_field(runs, tmp_path, name, edit, message):
    record = json.loads(sidecar_file(runs[0], "a").read_bytes())
    path = tmp_path / "a.json"
    path.write_text(json.dumps(_edited(record, edit)))
    with pytest.raises(SidecarError) as caught:
        Sidecar.read(path)
    assert message in str(caught.value) and str(caught.value).startswith(f"{path}: not an svdbatch item record (")
    assert not caught.value.parse


def test_a_truncated_sidecar_does_not_parse(runs, tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(sidecar_file(runs[0], "a").read_bytes()[:-40])
    with pytest.raises(SidecarError, match=f"^{path}: does not parse: ") as caught:
        Sidecar.read(path)
    assert caught.value.parse
    with pytest.raises(SidecarError, match="does not parse"):
        Sidecar.from_json(b"\xff\xfe not utf-8")
    with pytest.raises(SidecarError, match=r"^not an svdbatch item record \(a JSON list, not an object\)$"):
        Sidecar.from_json("[1, 2]")


def test_a_record_of_an_older_svdbatch_without_file_hash_reads_and_verify_says_so(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    path = sidecar_file(run_dir, "a")
    path.write_text(
        json.dumps(_edited(json.loads(path.read_bytes()), lambda r: (r["output"].pop("sha256"), r.pop("output_key"))))
    )
    sidecar = Sidecar.read(path)
    assert sidecar.output.sha256 is None and sidecar.output_key is None
    problems = " ".join(check_item(run_dir, "a", None).problems)
    assert "records no file sha256 / output key (written by an older svdbatch)" in problems


def test_verify_reports_a_foreign_sidecar_and_repair_still_finds_the_output_it_names(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    path = sidecar_file(run_dir, "a")
    path.write_text(json.dumps(_edited(json.loads(path.read_bytes()), lambda r: r["row"].pop("line"))))
    record = latest_by_id(results_of(run_dir))["a"]
    report = check_item(run_dir, "a", record)
    assert report.problems == ["sidecar is not an svdbatch item record (field 'row.line' is missing)"]
    assert item_files(run_dir, "a", None) == [
        sidecar_rel(run_dir, "a"),
        video_rel(run_dir, "a"),
    ]  # from the damaged sidecar alone
    store = RunStore(run_dir, "mp4")
    assert store.read_sidecar("a") is None and store.done_record("a", record["key"], record["output_key"]) is None


def test_the_gallery_shows_a_done_item_whose_sidecar_is_unreadable_from_its_results_line(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir, ignore=shutil.ignore_patterns("gallery", "index.html"))
    path = sidecar_file(run_dir, "a")
    body = path.read_bytes()
    path.write_bytes(body.replace(b'"schema": 1', b'"schema": 7'))  # same size: still done by its results line
    assert len(path.read_bytes()) == len(body)
    text = write_gallery(run_dir).read_text(encoding="utf-8")
    assert text.count("<article") == 2 and f'src="{video_rel(run_dir, "a")}"' in text and "video missing" not in text


def test_a_redo_keeps_the_output_of_a_sidecar_of_another_schema(runs, tmp_path):
    """A run dir written by another svdbatch version: its sidecars are not readable as
    records, but a redo with run.keep_replaced still moves their outputs aside, never over."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir, ignore=shutil.ignore_patterns("gallery", "index.html"))
    path = sidecar_file(run_dir, "a")
    path.write_text(json.dumps(_edited(json.loads(path.read_bytes()), lambda r: r.update(schema=2))))
    old_sidecar, old_video = path.read_bytes(), (video_file(run_dir, "a", ".mp4")).read_bytes()
    cfg = make_cfg(
        f"manifest={runs[0].parent / 'm.csv'}", f"run.dir={run_dir}", "conditioning.num_inference_steps=1", "run.limit=1"
    )
    assert run(cfg).done == 1
    [kept] = (run_dir / "replaced").iterdir()
    assert (kept / sidecar_rel(run_dir, "a")).read_bytes() == old_sidecar
    assert (kept / video_rel(run_dir, "a")).read_bytes() == old_video
    assert Sidecar.read(path).params["num_inference_steps"] == 1
