"""`svdbatch reproduce <sidecar.json>`: regenerate one item from its sidecar alone."""

from __future__ import annotations

import json

from svdbatch import run
from svdbatch.commands import reproduce as reproduce_command
from tests.conftest import make_cfg, make_image, run_cli, write_csv

from .runfiles import sidecar_file, video_file


def test_reproduce_matches_and_reports_differences(tmp_path, images, capsys):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed", "motion_bucket_id"], [["a", "img/a.png", 11, 40]])
    run_dir = tmp_path / "run"
    assert (
        run(
            make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "conditioning.resize=pad", "conditioning.decode_chunk_size=2")
        ).done
        == 1
    )
    sidecar_path = sidecar_file(run_dir, "a")

    # From another directory, in a fresh process: only the sidecar is given.
    proc = run_cli("reproduce", str(sidecar_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(sidecar_path.read_text())["frames_sha256"]
    assert f"a: frames match the sidecar (sha256 {recorded})" in proc.stdout
    written = json.loads(sidecar_path.read_text())["output"]["sha256"]
    assert f"a: file on disk matches the sidecar (sha256 {written})" in proc.stdout

    # The same frames, but the video on disk was damaged after the run: said, and exit 1.
    video = video_file(run_dir, "a", ".mp4")
    intact = video.read_bytes()
    video.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))
    assert reproduce_command([str(sidecar_path)]) == 1
    out = capsys.readouterr().out
    assert f"a: frames match the sidecar (sha256 {recorded})" in out and "a: file on disk DIFFERS from the sidecar" in out
    video.write_bytes(intact)

    # A sidecar whose recorded frames came from another seed: regenerating gives other frames.
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["seed"] = 12
    sidecar["quality"]["attempts"][0]["seed"] = 12  # the kept attempt's seed is the one generated with
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(sidecar))
    assert reproduce_command([str(edited)]) == 1
    assert f"frames DIFFER: recorded sha256 {recorded}" in capsys.readouterr().out

    # A changed input image cannot reproduce anything: exit 2 with the reason.
    make_image(images["a"], seed=99)
    assert reproduce_command([str(sidecar_path)]) == 2
    assert "input image changed since the run" in capsys.readouterr().err
    assert reproduce_command([str(tmp_path / "nope.json")]) == 2
