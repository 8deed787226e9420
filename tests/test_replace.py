"""Re-running into a finished run dir with changed settings: the plan says what it will
replace and why, keeps the old outputs (run.keep_replaced), and says nothing when only
settings that do not change the frames differ."""

from __future__ import annotations

import json
import logging

from svdbatch import run
from svdbatch.engine.plan import Replacement
from svdbatch.engine.plan_report import describe_replacements
from tests.conftest import SAMPLE_CSV, make_cfg

from .runfiles import results_of, sidecar_file, sidecar_rel, video_file, video_rel

BASE = [f"manifest={SAMPLE_CSV}", "run.num_threads=1", "run.progress=false", "run.gallery=false"]
IDS = ("sunset", "rocket", "waves")


def replace_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "will be redone" in r.getMessage()]


def test_readme_pad_recipe_reports_and_keeps_what_it_replaces(tmp_path, caplog):
    run_dir = tmp_path / "sample"
    base = [*BASE, f"run.dir={run_dir}"]
    assert run(make_cfg(*base)).done == 3
    before = {i: (video_file(run_dir, i).read_bytes(), (sidecar_file(run_dir, f"{i}")).read_bytes()) for i in IDS}

    caplog.set_level(logging.INFO)
    # The README's recipe, into the same run dir.
    padded = run(make_cfg(*base, "conditioning.resize=pad", 'conditioning.pad_color="#202020"'))
    assert padded.done == 3
    [message] = replace_messages(caplog)
    assert "3 items redone: resize crop -> pad, pad_color #000000 -> #202020 (sunset, rocket, waves)" in message
    assert "new run.name" in message
    [kept] = list((run_dir / "replaced").iterdir())
    assert str(kept) in message
    for item_id, (video, sidecar) in before.items():
        assert (kept / video_rel(run_dir, item_id)).read_bytes() == video
        assert (kept / sidecar_rel(run_dir, item_id)).read_bytes() == sidecar
        assert json.loads((sidecar_file(run_dir, f"{item_id}")).read_text())["preprocess"]["resize"] == "pad"  # really redone

    # Unchanged settings, or a change that does not touch the frames: no report, all skipped.
    caplog.clear()
    again = run(
        make_cfg(
            *base, "conditioning.resize=pad", 'conditioning.pad_color="#202020"', "run.gallery=true", "run.keep_replaced=false"
        )
    )
    assert (again.done, again.skipped) == (0, 3)
    assert replace_messages(caplog) == []
    assert len(list((run_dir / "replaced").iterdir())) == 1

    # keep_replaced=false: still reported, nothing moved aside.
    caplog.clear()
    stretched = run(make_cfg(*base, "conditioning.resize=stretch", "run.keep_replaced=false", "run.limit=1"))
    assert stretched.done == 1
    [message] = replace_messages(caplog)
    assert "1 item redone: resize pad -> stretch, pad_color #202020 -> #000000 (sunset)" in message
    assert "overwritten" in message
    assert len(list((run_dir / "replaced").iterdir())) == 1
    assert len(list(results_of(run_dir))) == 7


def test_each_changed_field_is_named():
    """Seeds that differ per row are named once, with an example; a model change is named too."""

    class Entry:
        def __init__(self, item_id):
            self.item = type("I", (), {"id": item_id})()

    lines = describe_replacements(
        [
            Replacement(Entry("a"), "k1", (("seed", 1, 11),)),
            Replacement(Entry("b"), "k2", (("seed", 2, 12),)),
            Replacement(Entry("c"), "k3", (("model.dtype", "float32", "bfloat16"), ("image", "aaaa", "bbbb"))),
        ]
    )
    assert lines == [
        "2 items redone: seed differs (e.g. 1 -> 11) (a, b)",
        "1 item redone: model.dtype float32 -> bfloat16, image sha256 aaaa… -> sha256 bbbb… (c)",
    ]
