"""Sweeps as one thing: the README's sweep run literally (with two CPU workers), identical
items reused across points instead of generated again, one pipeline load per worker for the
whole sweep, the comparison page (also rendered in headless Chromium), the sweep's status,
run.reuse_from, and presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from PIL import Image

from svdbatch import run
from svdbatch.commands import status as status_command
from svdbatch.core.errors import ConfigError
from svdbatch.core.jsonl import latest_by_id
from svdbatch.engine.plan_report import shadowed_knobs_warning
from svdbatch.inputs.manifest import read_manifest
from svdbatch.reports import status
from svdbatch.reports.sweep_page import write_sweep_page
from svdbatch.reports.sweep_root import point_dirs, sweep_points
from tests.conftest import FAST, SAMPLE_CSV, make_cfg, run_cli
from tests.test_gallery import find_chromium

from .runfiles import results_of, sidecar_file, video_file, video_rel

# The README's sweep, as written there, plus two CPU workers and the small test sizes.
README_SWEEP = [
    "-m",
    "conditioning.motion_bucket_id=60,180",
    "conditioning.noise_aug_strength=0.02,0.1",
    "manifest=manifests/sample.csv",
]
LABELS = [("60", "0.02"), ("60", "0.1"), ("180", "0.02"), ("180", "0.1")]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_cache) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("sweep") / "sample"
    proc = run_cli(
        *README_SWEEP, *FAST, "run.workers=2", "run.num_threads=1", "run.progress=false", f"hydra.sweep.dir={root}", timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def results(point: Path) -> dict[str, dict]:
    return latest_by_id(results_of(point))


def points_by_label(root: Path) -> dict[tuple[str, str], Path]:
    return {
        (p.label["conditioning.motion_bucket_id"], p.label["conditioning.noise_aug_strength"]): p.run_dir
        for p in sweep_points(root)
    }


def test_identical_items_are_generated_once_and_linked_elsewhere(sweep):
    root, proc = sweep
    points = points_by_label(root)
    assert sorted(points) == sorted(LABELS)
    generated: dict[str, int] = {}
    for _label, point in points.items():
        records = results(point)
        assert sorted(records) == ["rocket", "sunset", "waves"]  # every point is complete
        for item_id, record in records.items():
            if not record.get("reused_from"):
                generated[item_id] = generated.get(item_id, 0) + 1
    # rocket sets both swept knobs in its row: one generation for 4 points; waves sets the
    # motion bucket: one per noise level; sunset follows the sweep: 4.
    assert generated == {"rocket": 1, "waves": 2, "sunset": 4}
    assert proc.stdout.count("reused") == 3 and "3 done, 0 skipped" in proc.stdout

    origin = points[("60", "0.02")]
    reused_rocket = points[("180", "0.1")]
    sidecar = json.loads((sidecar_file(reused_rocket, "rocket")).read_text())
    assert sidecar["reused_from"]["run_dir"] == str(origin.resolve()) and sidecar["reused_from"]["id"] == "rocket"
    assert sidecar["row"]["overrides"] == {"motion_bucket_id": 180, "noise_aug_strength": 0.05}
    original = json.loads((sidecar_file(origin, "rocket")).read_text())
    assert sidecar["key"] == original["key"] and sidecar["frames_sha256"] == original["frames_sha256"]
    assert sidecar["params"] == original["params"] and sidecar["output"]["path"] == video_rel(reused_rocket, "rocket")
    # A hard link: the same bytes, no second copy on disk.
    assert os.stat(video_file(reused_rocket, "rocket", ".mp4")).st_ino == os.stat(video_file(origin, "rocket", ".mp4")).st_ino


def test_one_load_per_worker_for_the_whole_sweep(sweep):
    _, proc = sweep
    assert proc.stderr.count("loaded tiny") == 2, proc.stderr[-3000:]  # not 2 per point (8)


def test_one_warning_names_the_rows_that_shadow_a_swept_knob(sweep):
    _, proc = sweep
    warnings = [line for line in proc.stderr.splitlines() if "manifest values override the swept" in line]
    assert len(warnings) == 1, warnings
    assert "rocket, waves: manifest values override the swept conditioning.motion_bucket_id" in warnings[0]
    assert "rocket: manifest values override the swept conditioning.noise_aug_strength" in warnings[0]


def test_shadow_warning_unit():
    items = read_manifest(SAMPLE_CSV).items
    assert shadowed_knobs_warning(items, {"fps": "conditioning.fps"}) is None
    assert shadowed_knobs_warning(items, {"motion_bucket_id": "conditioning.motion_bucket_id"}) == (
        "rocket, waves: manifest values override the swept conditioning.motion_bucket_id"
    )


def test_a_rerun_resumes_every_point_and_generates_nothing(sweep):
    root, _ = sweep
    again = run_cli(
        *README_SWEEP, *FAST, "run.workers=2", "run.num_threads=1", "run.progress=false", f"hydra.sweep.dir={root}", timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("0 done, 3 skipped") == 4
    assert "loaded tiny" not in again.stderr  # nothing to do: no worker starts


class SweepPage(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.columns: list[str] = []
        self.rows: list[str] = []
        self.videos: list[dict] = []
        self.images: list[str] = []
        self.reused = 0
        self._in: str = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "th" and attrs.get("class") != "item":
            self._in = "th"
            self.columns.append("")
        elif tag == "h2":
            self._in = "h2"
        elif tag == "video":
            self.videos.append(attrs)
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "span" and attrs.get("class") == "reused":
            self.reused += 1

    def handle_endtag(self, tag):
        if tag in ("th", "h2"):
            self._in = ""

    def handle_data(self, data):
        if self._in == "th":
            self.columns[-1] += data
        elif self._in == "h2":
            self.rows.append(data)


def test_comparison_page_one_row_per_item_one_column_per_point(sweep, tmp_path):
    root, _ = sweep
    page = SweepPage((root / "index.html").read_text(encoding="utf-8"))  # written by the sweep itself
    assert page.rows == ["sunset", "rocket", "waves"]  # manifest order
    assert page.columns == [f"motion_bucket_id={m}noise_aug_strength={n}" for m, n in LABELS]
    assert len(page.videos) == 12 and page.reused == 5
    for video in page.videos:  # nothing loads until it is on screen
        assert video["preload"] == "none" and "src" not in video and "autoplay" not in video
    copy = tmp_path / "copied"  # relative links: the folder works wherever it is copied
    shutil.copytree(root, copy)
    for video in page.videos:
        assert (copy / unquote(video["data-src"])).is_file()
        with Image.open(copy / unquote(video["poster"])) as poster:
            assert poster.size == (64, 64)  # the first frame, from the video itself
    for src in page.images:
        assert (copy / unquote(src)).is_file()
    # A sweep root that is also a plain run's dir keeps that run's contact sheet as index.html.
    (copy / "index.html").write_text("the run's own contact sheet")
    (copy / "results.jsonl").write_text("")
    assert write_sweep_page(copy) == copy / "sweep.html"
    assert (copy / "index.html").read_text() == "the run's own contact sheet"


def test_comparison_page_renders_in_headless_chromium(sweep, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not installed; apt install chromium")
    root, _ = sweep
    index = write_sweep_page(root)
    shot = tmp_path / "sweep.png"
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1300,800",
            "--virtual-time-budget=3000",
            index.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    assert rgb.size == (1300, 800)
    assert len(rgb.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 1000  # videos/posters drawn, not a flat table
    # The posters sit in the cells (dark video boxes): the left of the first row's cells is not blank.
    cell = rgb.crop((200, 130, 400, 330))
    assert sum(1 for r, g, b in cell.getdata() if abs(r - g) > 8 or abs(g - b) > 8) > 2000

    def loaded_videos(height: int) -> int:
        """Videos the page's script gave a source to (= started loading) in a window this tall."""
        dom = subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                f"--window-size=1300,{height}",
                "--virtual-time-budget=3000",
                index.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
        return sum(" src=" in tag for tag in dom.split("<video")[1:])

    assert 0 < loaded_videos(300) < 12  # only the rows on screen load
    assert loaded_videos(3000) == 12


def test_status_of_a_sweep_root(sweep, tmp_path, capsys):
    root, _ = sweep
    copy = tmp_path / "sample"
    shutil.copytree(root, copy)
    # One point has a failure instead of sunset; another point was never started.
    failing = points_by_label(copy)[("60", "0.1")]
    for results in (failing / "records").glob("*.results.jsonl"):
        kept = [line for line in results.read_text().splitlines() if '"id": "sunset"' not in line]
        results.write_text("".join(line + "\n" for line in kept))
    (failing / "failures.jsonl").write_text(
        json.dumps({"id": "sunset", "key": "k", "error": "RuntimeError: boom at step 3", "time": "2026-01-01T00:00:00+0000"})
        + "\n"
    )
    shutil.rmtree(points_by_label(copy)[("180", "0.1")])

    assert status_command([str(copy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["points"]) == 3 and report["unstarted_points"] == [
        {"conditioning.motion_bucket_id": "180", "conditioning.noise_aug_strength": "0.1"}
    ]
    assert report["counts"]["done"] == 8 and report["counts"]["failed"] == 1
    assert report["counts"]["total"] == 12  # 3 points x 3 rows + 3 rows of the unstarted point
    assert report["remaining"] == 3 and report["reasons"][0]["count"] == 1
    assert report["reasons"][0]["points"] == ["motion_bucket_id=60, noise_aug_strength=0.1"]

    assert status_command([str(copy)]) == 0
    text = capsys.readouterr().out
    assert "motion_bucket_id=180, noise_aug_strength=0.1" in text and "(not started)" in text
    assert "RuntimeError: boom at step #" in text
    proc = run_cli("status", str(root))  # the real command, on the untouched sweep
    assert proc.returncode == 0 and " 12 " in proc.stdout.splitlines()[-3], proc.stdout


def test_points_are_found_by_hydra_records_not_folder_names(tmp_path):
    root = tmp_path / "root"
    (root).mkdir()
    (root / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"overrides": {"task": ["preset=svd,svd_xt", "manifest=m.csv"]}}})
    )
    for number, preset in enumerate(["svd", "svd_xt"]):
        point = root / "nested" / f"job{number}"  # any sweep.subdir scheme
        (point / ".hydra").mkdir(parents=True)
        (point / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"preset={preset}", "manifest=m.csv"]))
    (root / "not-a-point").mkdir()
    assert [p.name for p in point_dirs(root)] == ["job0", "job1"]
    assert [p.label for p in sweep_points(root)] == [{"preset": "svd"}, {"preset": "svd_xt"}]


def test_reuse_from_an_earlier_run_and_only_with_equal_output_settings(sweep, tmp_path):
    root, _ = sweep
    base = [f"manifest={SAMPLE_CSV}", "run.num_threads=1", "run.progress=false", "conditioning.motion_bucket_id=60"]
    same = run(make_cfg(*base, f"run.dir={tmp_path / 'same'}", f"run.reuse_from=[{root}]"))
    assert (same.done, same.reused) == (0, 3)  # every item of that point exists in the sweep
    gif = run(make_cfg(*base, f"run.dir={tmp_path / 'gif'}", f"run.reuse_from=[{root}]", "output=gif", "run.limit=1"))
    assert (gif.done, gif.reused) == (1, 0)  # another file format: not the same output
    plain_run = run(make_cfg(*base, f"run.dir={tmp_path / 'plain'}", "run.limit=1"))
    assert plain_run.reused == 0  # opt-in outside a sweep
    with pytest.raises(ConfigError, match="run.reuse_from: .* does not exist"):
        run(make_cfg(*base, f"run.dir={tmp_path / 'bad'}", f"run.reuse_from=[{tmp_path / 'nope'}]"))


@pytest.mark.parametrize(
    "overrides,model,frames",
    [
        ([], "tiny", 8),
        (["preset=svd_xt"], "svd_xt", 25),
        (["preset=svd_xt", "model=svd"], "svd", 25),  # an explicit group still wins
        (["model=svd_xt", "conditioning=svd"], "svd_xt", 14),
    ],
)
def test_presets_pair_model_and_conditioning(overrides, model, frames):
    cfg = make_cfg("manifest=x.csv", *overrides, fast=False)
    assert (cfg.model.name, cfg.conditioning.num_frames) == (model, frames)


def test_a_big_sweeps_page_is_the_same_from_sidecars_and_from_its_cell_cache(sweep, tmp_path, monkeypatch):
    """Points with status.FAST_FROM results or more: the page reads only the shown items'
    sidecars once, then rewrites from <point>/cache/page-cells.json; it must not differ."""
    root, _ = sweep
    copy = tmp_path / "big"
    shutil.copytree(root, copy)

    def table(path: Path) -> str:
        text = path.read_text(encoding="utf-8")
        return text[text.index("<table>") :]

    small = table(write_sweep_page(copy))
    monkeypatch.setattr(status, "FAST_FROM", 0)
    first = table(write_sweep_page(copy))
    caches = list(copy.glob("*/cache/page-cells.json"))
    assert len(caches) == 4 and all(json.loads(c.read_text())["cells"] for c in caches)
    again = table(write_sweep_page(copy))
    assert small == first == again
    point = points_by_label(copy)[("60", "0.1")]
    video_file(point, "sunset").unlink()  # an output deleted: the cached cell is not trusted
    assert "video missing" in table(write_sweep_page(copy))
