"""Quality signals, rules, redoes of duds, the NaN rescue ladder and `svdbatch score`
(docs/quality.md): synthetic clips with known answers, then runs of the tiny model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from svdbatch import api
from svdbatch.core.config import OutputConfig
from svdbatch.core.errors import ConfigError
from svdbatch.core.measure import measure
from svdbatch.core.quality import SIGNALS, QualityConfig, attempt_seed, check_quality, key_part, verdict
from svdbatch.engine.checks import check_config
from svdbatch.reports.gallery import parse_condition, write_gallery
from svdbatch.reports.status import collect, quality_summary
from svdbatch.reports.sweep_page import quality_row
from svdbatch.rundir import summaries
from svdbatch.rundir.dataset import write_dataset
from svdbatch.rundir.outputs import write_video
from svdbatch.rundir.store import RunStore
from tests.conftest import FAST, make_cfg, make_image, run_cli, write_csv
from tests.runfiles import failures_of, results_of, sidecar_file

THREADS = "run.num_threads=1"  # float results depend on it: the same in every run compared


# -- synthetic clips with known answers ----------------------------------------------------
def texture(height: int, width: int) -> np.ndarray:
    """A smooth grey texture, wider than the frame so that it can slide (period 64 px)."""
    x = np.arange(width * 4, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)
    base = 127 + 50 * np.sin(2 * np.pi * x / 64)[None, :] + 50 * np.cos(2 * np.pi * y / 48)[:, None]
    return base.clip(0, 255)


def sliding(shift: int, height: int = 144, width: int = 256, frames: int = 8) -> np.ndarray:
    """uint8 RGB frames of the texture moving `shift` px to the left per frame."""
    base = texture(height, width)
    out = [np.repeat(base[:, i * shift : i * shift + width, None], 3, axis=2) for i in range(frames)]
    return np.stack(out).astype(np.uint8)


def test_a_static_clip_scores_no_motion():
    signals = measure(sliding(0))
    assert signals.motion < 0.01 and signals.motion_max < 0.01
    assert signals.flicker < 1e-3 and (signals.black_frames, signals.white_frames, signals.flat_frames) == (0, 0, 0)


def test_a_faster_pattern_scores_more_motion_at_any_resolution():
    slow, fast = measure(sliding(4)).motion, measure(sliding(16)).motion
    assert 0 < slow < fast
    assert slow == pytest.approx(100 * 4 / 256, rel=0.2)  # % of the width per frame
    assert fast == pytest.approx(100 * 16 / 256, rel=0.2)
    # The same clip at twice the size (the pattern and its speed scaled) scores the same.
    big = np.stack([np.kron(f, np.ones((2, 2, 1), dtype=np.uint8)) for f in sliding(4)])
    assert measure(big).motion == pytest.approx(slow, rel=0.1)


def test_a_black_frame_is_flagged_and_breaks_a_no_black_frames_rule():
    clip = sliding(4)
    clip[3] = 0
    signals = measure(clip)
    assert signals.black_frames == 1 and signals.flat_frames == 1 and signals.brightness_min == 0.0
    assert signals.flicker > 0.4  # a jump from mid-grey to black and back
    rules = QualityConfig(max_black_frames=0)
    assert verdict(signals.as_dict(), rules) == ["black_frames 1 > max 0"]
    assert verdict(measure(sliding(4)).as_dict(), rules) == []
    white = sliding(4)
    white[5] = 255
    assert measure(white).white_frames == 1


def test_first_frame_fidelity_is_high_for_the_source_and_low_for_an_unrelated_image():
    clip = sliding(4)
    same = measure(clip, clip[0]).first_frame_psnr
    assert same is not None and same >= 99
    noise = np.random.default_rng(0).integers(0, 256, clip.shape[1:], dtype=np.uint8)
    other = measure(clip, noise).first_frame_psnr
    assert other is not None and other < 12
    # A source of another size is fitted to the frames' size first.
    from PIL import Image

    assert measure(clip, Image.fromarray(clip[0]).resize((512, 288))).first_frame_psnr > 30
    assert measure(clip).first_frame_psnr is None


def test_signal_names_rules_and_seeds():
    assert SIGNALS[0] == "motion" and "first_frame_psnr" in SIGNALS
    # Every rule field names a signal (check_quality would say so otherwise).
    assert check_quality(QualityConfig()) == []
    assert attempt_seed(7, 0) == 7  # attempt 0 is the row's seed: quality off changes nothing
    seeds = [attempt_seed(7, n) for n in range(5)]
    assert len(set(seeds)) == 5 and seeds == [attempt_seed(7, n) for n in range(5)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert key_part(QualityConfig()) == {} and key_part(QualityConfig(min_motion=1.0)) == {}  # judging only
    assert key_part(QualityConfig(min_motion=1.0, max_attempts=3)) == {
        "quality": {"rules": {"min_motion": 1.0}, "max_attempts": 3}
    }
    assert verdict({"motion": 0.1, "first_frame_psnr": None}, QualityConfig(min_motion=0.5, min_first_frame_psnr=20)) == [
        "motion 0.1 < min 0.5"
    ]  # a signal that could not be measured breaks no rule


# -- bad config: exit 2 naming the key -------------------------------------------------------
def test_impossible_or_bad_rules_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"quality\.min_motion: 3\.0 is above quality\.max_motion"):
        check_config(make_cfg("manifest=x.csv", "quality.min_motion=3", "quality.max_motion=1"))
    with pytest.raises(ConfigError, match=r"quality\.max_attempts: must be an integer in \[1, 20\]"):
        check_config(make_cfg("manifest=x.csv", "quality.max_attempts=0"))
    with pytest.raises(ConfigError, match=r"quality\.max_flicker: must be a finite number >= 0"):
        check_config(make_cfg("manifest=x.csv", "quality.max_flicker=-1"))
    with pytest.raises(ConfigError, match=r"quality\.min_motio"):  # a rule naming no signal: unknown key
        make_cfg("manifest=x.csv", "+quality.min_motio=1")
    with pytest.raises(ConfigError, match=r"quality\.min_sharpness: unknown key"):
        api.quality_rules({"min_sharpness": 1})
    with pytest.raises(ConfigError, match=r"quality\.max_black_frames: must be a number or null, got 'none'"):
        api.quality_rules({"max_black_frames": "none"})


def test_the_cli_refuses_bad_rules_with_exit_2_naming_the_key(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [["a", "a.png"]])
    make_image(tmp_path / "a.png")
    wrong_type = run_cli("validate", f"manifest={manifest}", "quality.min_motion=lots")
    assert wrong_type.returncode == 2 and "quality.min_motion" in wrong_type.stderr
    impossible = run_cli("validate", f"manifest={manifest}", "quality=strict", "quality.min_motion=2", "quality.max_motion=1")
    assert impossible.returncode == 2 and "quality.min_motion" in impossible.stderr


# -- svdbatch score ------------------------------------------------------------------------
def test_score_measures_any_video_and_reports_unreadable_files(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(sliding(0), folder / "static.mp4", OutputConfig(), 7)
    write_video(sliding(16), folder / "moving.mp4", OutputConfig(), 7)
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "notes.txt").write_text("ignored: not a video suffix")
    scored = {Path(s.path).name: s for s in api.score([folder, tmp_path / "nope.mp4"], {"min_motion": 1.0})}
    assert set(scored) == {"static.mp4", "moving.mp4", "broken.mp4", "nope.mp4"}
    assert scored["broken.mp4"].error and scored["nope.mp4"].error
    static, moving = scored["static.mp4"], scored["moving.mp4"]
    assert static.signals is not None and moving.signals is not None
    assert static.signals["motion"] < 0.2 < moving.signals["motion"]
    assert static.dud and not moving.dud and static.frames == 8 and (static.width, static.height) == (256, 144)

    cli = run_cli("score", str(folder), str(tmp_path / "notes.txt"), "--rule", "min_motion=1")
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert cli.returncode == 1  # some files could not be read; every other one was scored
    assert [Path(line["path"]).name for line in lines] == ["broken.mp4", "moving.mp4", "static.mp4", "notes.txt"]
    assert "error" in lines[0] and "error" in lines[3] and "broken.mp4" in cli.stderr and "notes.txt" in cli.stderr
    assert lines[2]["dud"] is True and lines[2]["verdict"] == [f"motion {lines[2]['motion']:.4g} < min 1"]
    assert run_cli("score", str(folder), "--rule", "min_wobble=1").returncode == 2


# -- runs of the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quality")
    for n in range(2):
        make_image(root / "img" / f"q{n}.png", seed=n)
    return write_csv(root / "m.csv", ["id", "image", "seed"], [[f"q{n}", f"img/q{n}.png", n + 1] for n in range(2)])


def sidecars(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_bytes()) for p in sorted((run_dir / "items").rglob("*.json"))}


@pytest.fixture(scope="module")
def all_duds(manifest2, tmp_path_factory) -> Path:
    """Every attempt breaks the rule: 3 attempts each, all recorded, both items kept as duds."""
    run_dir = tmp_path_factory.mktemp("duds") / "run"
    cfg = make_cfg(f"manifest={manifest2}", f"run.dir={run_dir}", THREADS, "quality.min_motion=1000", "quality.max_attempts=3")
    summary = api.run(cfg)
    assert (summary.done, summary.failed) == (2, 0)
    return run_dir


def test_duds_are_redone_with_derived_seeds_kept_marked_and_left_out_of_the_dataset(all_duds, manifest2):
    records = sidecars(all_duds)
    for item_id, seed in (("q0", 1), ("q1", 2)):
        quality = records[item_id]["quality"]
        assert [a["seed"] for a in quality["attempts"]] == [attempt_seed(seed, n) for n in range(3)]
        assert all(a["verdict"] and a["precision"] == "as_loaded" for a in quality["attempts"])
        assert quality["dud"] is True and quality["kept"] == 0  # fewest rules broken, the earliest of equals
        assert quality["rules"] == {"min_motion": 1000.0, "max_attempts": 3}
        assert records[item_id]["seed"] == seed  # the row's seed: the key is the row's
    lines = results_of(all_duds)
    assert all(line["dud"] is True and line["attempts"] == 3 and set(line["signals"]) == set(SIGNALS) for line in lines)
    # status counts them, the exports leave them out unless asked for.
    assert collect(all_duds)["counts"]["duds"] == 2
    assert (all_duds / "metadata.jsonl").read_text() == ""
    write_dataset(RunStore(all_duds, "mp4"), OutputConfig(include_duds=True))
    rows = [json.loads(line) for line in (all_duds / "metadata.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"] and all(r["dud"] and r["attempts"] == 3 for r in rows)
    assert rows[0]["motion"] == records["q0"]["quality"]["attempts"][0]["signals"]["motion"]
    write_dataset(RunStore(all_duds, "mp4"), OutputConfig())
    assert (all_duds / "metadata.jsonl").read_text() == ""
    # score finds each video's sidecar (in its bucket folder) and so its conditioning image.
    scored = {s.path: s for s in api.score([all_duds / "videos"])}
    assert len(scored) == 2 and all(s.source is not None and s.signals["first_frame_psnr"] is not None for s in scored.values())
    # The gallery marks duds, sorts by a signal and filters.
    page = write_gallery(all_duds, sort_by="motion", ascending=True, duds="only").read_text()
    assert page.count('class="card done dud"') == 2 and "sorted by motion (ascending)" in page and "min 1000" in page
    motions = {i: records[i]["quality"]["attempts"][0]["signals"]["motion"] for i in ("q0", "q1")}
    first, second = sorted(motions, key=motions.__getitem__)
    assert page.index(f'title="{first}"') < page.index(f'title="{second}"')
    assert 'class="card' not in write_gallery(all_duds, duds="hide").read_text()
    only_first = write_gallery(all_duds, where=(parse_condition(f"motion<={motions[first]}"),)).read_text()
    assert f'title="{first}"' in only_first and f'title="{second}"' not in only_first and "motion &lt;= " in only_first
    for bad in ("motion=1", "wobble<1", "motion<abc"):
        with pytest.raises(ValueError, match="expected|unknown signal|not a number"):
            parse_condition(bad)


def test_redoes_are_deterministic_across_workers_and_reproduce_regenerates_the_kept_attempt(all_duds, manifest2, tmp_path):
    # A threshold between attempts' motions, from the all-duds run (the same seeds give the
    # same frames): some item's first attempt fails and a later one passes.
    motions = {i: [a["signals"]["motion"] for a in r["quality"]["attempts"]] for i, r in sidecars(all_duds).items()}
    item_id, threshold = next(
        (i, (m[0] + max(m[1:])) / 2) for i, m in sorted(motions.items(), key=lambda kv: kv[0]) if max(m[1:]) > m[0]
    )
    rule = [f"quality.min_motion={threshold}", "quality.max_attempts=3", THREADS]
    one = tmp_path / "one"
    assert api.run(make_cfg(f"manifest={manifest2}", f"run.dir={one}", *rule)).done == 2
    two = tmp_path / "two"
    cli = run_cli(f"manifest={manifest2}", f"run.dir={two}", "run.workers=2", "run.progress=false", *rule, *FAST)
    assert cli.returncode == 0, cli.stderr
    a, b = sidecars(one), sidecars(two)
    for i in a:
        assert a[i]["quality"] == b[i]["quality"] and a[i]["frames_sha256"] == b[i]["frames_sha256"]
        expected = next((n for n, m in enumerate(motions[i]) if m >= threshold), 0)
        assert a[i]["quality"]["kept"] == expected and a[i]["quality"]["dud"] is (motions[i][expected] < threshold)
        assert [s["signals"] for s in a[i]["quality"]["attempts"]] == [
            s["signals"] for s in sidecars(all_duds)[i]["quality"]["attempts"][: expected + 1]
        ]
    assert a[item_id]["quality"]["kept"] > 0
    result = api.reproduce(sidecar_file(one, item_id))
    assert result.matches and result.file_ok


def test_nan_frames_are_rescued_with_the_vae_decode_in_fp32_and_reproduce_the_same(tmp_path, manifest2, monkeypatch):
    monkeypatch.setenv("SVDBATCH_FAULT", "frames:1:nan")  # the first video generated is NaN, as fp16 can give
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    run_dir = tmp_path / "run"
    summary = api.run(make_cfg(f"manifest={manifest2}", f"run.dir={run_dir}", THREADS, "run.limit=1"))
    assert (summary.done, summary.failed) == (1, 0)
    quality = sidecars(run_dir)["q0"]["quality"]
    assert [a["precision"] for a in quality["attempts"]] == ["vae_fp32"]
    monkeypatch.delenv("SVDBATCH_FAULT")
    assert api.reproduce(sidecar_file(run_dir, "q0")).matches  # regenerated at the recorded step


def test_nan_frames_at_every_step_fail_the_item_with_the_hint(tmp_path, manifest2, monkeypatch):
    monkeypatch.setenv("SVDBATCH_FAULT", "frames:1+:nan")
    monkeypatch.setattr("svdbatch.core.faults._reached", Counter())
    run_dir = tmp_path / "run"
    summary = api.run(make_cfg(f"manifest={manifest2}", f"run.dir={run_dir}", THREADS, "run.limit=1"))
    assert (summary.done, summary.failed) == (0, 1)
    (failure,) = failures_of(run_dir)
    assert "NaN/inf" in failure["error"] and "fp32" in failure["error"] and "model.dtype=float32" in failure["error"]


# -- the sweep page's quality row --------------------------------------------------------------
def totals_of(lines: list[dict]) -> summaries.RunTotals:
    """What summaries.totals sums from the writers' summaries, for these results lines."""
    summary = summaries.Summary()
    for line in lines:
        summary.add_quality(line)
    return summaries.RunTotals(judged=summary.judged, duds=summary.duds, signals=summary.signals)


def test_the_sweep_page_compares_each_points_signals_and_dud_rate():
    lines = [
        {"dud": True, "signals": {"motion": 1.0, "flicker": 0.1}},
        {"dud": False, "signals": {"motion": 3.0, "flicker": 0.1}},
        {"id": "old"},  # made before signals: not counted
    ]
    summary = quality_summary(totals_of(lines))
    assert summary["items"] == 2 and summary["duds"] == 1 and summary["dud_rate"] == 0.5
    assert summary["signals"]["motion"] == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0}
    row = quality_row([summary, quality_summary(totals_of([]))])
    assert "50% duds (1/2)" in row and "motion</span> 2 ± 1" in row and "no signals" in row
    assert quality_row([quality_summary(totals_of([]))]) == ""
