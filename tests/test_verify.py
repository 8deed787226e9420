"""`svdbatch verify`: every finished item checked byte for byte; damaged ones named, and with
--repair set aside (moved, never deleted) so the next run of the same command redoes them."""

from __future__ import annotations

import json
from pathlib import Path

import svdbatch
from svdbatch import run

from .conftest import make_cfg, run_cli, write_csv
from .runfiles import sidecar_file, sidecar_rel, video_file, video_rel
from .test_exports import samples


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: resume's stat cannot see it, verify must


def test_verify_names_damaged_items_and_repair_makes_the_next_run_redo_exactly_them(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [[n, f"img/{n}.png", i] for i, n in enumerate("abc")])
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "output.webdataset=true", "output.shard_size=2")
    assert run(cfg).done == 3
    good = run_cli("verify", str(run_dir))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "3 items checked, 3 intact, 0 damaged" in good.stdout
    intact_c = (video_file(run_dir, "c", ".mp4")).read_bytes()

    flip_last_byte(video_file(run_dir, "a", ".mp4"))  # bit rot in a video
    (sidecar_file(run_dir, "b")).unlink()  # a lost sidecar
    damaged = run_cli("verify", str(run_dir), "--json")
    assert damaged.returncode == 1, damaged.stderr
    report = json.loads(damaged.stdout)
    problems = {entry["id"]: " ".join(entry["problems"]) for entry in report["damaged"]}
    assert sorted(problems) == ["a", "b"] and report["ok"] == 1
    assert "sha256" in problems["a"] and f"sidecar {sidecar_rel(run_dir, 'b')} is missing" in problems["b"]

    repaired = run_cli("verify", str(run_dir), "--repair")
    assert repaired.returncode == 1 and "set aside 2 item(s)" in repaired.stdout, repaired.stdout + repaired.stderr
    (aside,) = (run_dir / "damaged").iterdir()
    assert (aside / video_rel(run_dir, "a")).is_file() and (aside / sidecar_rel(run_dir, "a")).is_file()
    assert (aside / video_rel(run_dir, "b")).is_file()  # moved, not deleted
    assert sorted(samples(run_dir)) == ["c"]  # the shards are rebuilt without what was set aside
    assert not (video_file(run_dir, "a", ".mp4")).exists()
    assert [json.loads(line)["id"] for line in (run_dir / "metadata.jsonl").read_text().splitlines()] == ["c"]
    assert sorted(json.loads((aside / "report.json").read_text())["set_aside"][i]["item_id"] for i in range(2)) == ["a", "b"]
    after = run_cli("verify", str(run_dir))  # set aside = not done, no longer damage
    assert after.returncode == 0 and "note a: not done any more" in after.stdout, after.stdout

    again = run(cfg)  # the same command
    assert (again.done, again.skipped, again.failed) == (2, 1, 0)
    assert (video_file(run_dir, "c", ".mp4")).read_bytes() == intact_c
    assert sorted(samples(run_dir)) == ["a", "b", "c"]
    final = run_cli("verify", str(run_dir))
    assert final.returncode == 0 and "3 intact, 0 damaged" in final.stdout, final.stdout


def test_a_truncated_sidecar_and_a_wrong_decode_are_damage(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2]])
    run_dir = tmp_path / "run"
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "output=frames")).done == 2
    sidecar = sidecar_file(run_dir, "a")
    sidecar.write_bytes(sidecar.read_bytes()[:-40])
    (video_file(run_dir, "b", "") / "00003.png").unlink()  # one PNG frame lost
    result = run_cli("verify", str(run_dir))
    assert result.returncode == 1
    assert "DAMAGED a: sidecar does not parse" in result.stdout
    assert "DAMAGED b:" in result.stdout and "decodes to 3 frames of 64x64, expected 4 frames of 64x64" in result.stdout
    # status and resume agree that neither is done (sizes no longer match what was committed).
    assert svdbatch.status(run_dir)["counts"]["done"] == 0


def test_not_a_run_dir_exits_2(tmp_path):
    result = run_cli("verify", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_dataset_files_that_list_a_missing_item_are_not_all_intact(tmp_path, images):
    """Both files of an item gone (as a failed redo once left it): verify must not call the
    run dir intact while metadata.jsonl and a shard still list the item; --repair rewrites them."""
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2]])
    run_dir = tmp_path / "run"
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "output.webdataset=true")).done == 2
    (video_file(run_dir, "a", ".mp4")).unlink()
    (sidecar_file(run_dir, "a")).unlink()
    stale = run_cli("verify", str(run_dir))
    assert stale.returncode == 1, stale.stdout
    assert "STALE metadata.jsonl lists 1 item(s) that are not finished or whose file is missing: a" in stale.stdout
    assert "STALE webdataset/ holds 1 item(s) that are not finished: a" in stale.stdout
    repaired = run_cli("verify", str(run_dir), "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout
    assert json.loads(repaired.stdout)["stale_exports"] == []
    assert [json.loads(line)["id"] for line in (run_dir / "metadata.jsonl").read_text().splitlines()] == ["b"]
    assert sorted(samples(run_dir)) == ["b"]
