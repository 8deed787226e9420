"""`svdbatch status` at scale (issue 22): a 1M-item run dir, and a sweep of 50 points x 20k.

Builds the run dirs' bookkeeping as runs would leave it, fast and fake (no model, no
videos for the million: status never opens them): a manifest of N rows with the summary a
run saves (cache/manifest-*.json), N results lines of the usual size spread over 16 writer
files with their summaries (summaries.py; the last writer's summary left behind by 64 lines,
the most a killed writer leaves), 1% failures, layout 2. Then times, each in a fresh
process (wall, CPU, peak RSS):

  * `svdbatch status <run dir>` and `--json`
  * `svdbatch status <sweep root>` of 50 points x 20k items
  * the sweep's comparison page (sweep_page.write_sweep_page, 500 rows x 50 points: the shown
    items have sidecars, videos and posters, as a finished sweep has)

    python bench/status_scale.py [--items 1000000] [--points 50 --point-items 20000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from svdbatch.reports.status import save_manifest_summary
from svdbatch.rundir import records, summaries
from svdbatch.rundir.layout import GROUPED, LAYOUT_FILE, asset_relpath, item_relpath, sidecar_relpath
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarImage, SidecarOutput, SidecarRow, Timings

WRITERS = 16
STALE_TAIL = 64  # lines of the last writer its summary does not cover yet (record_writer.SUMMARY_EVERY: the most a kill leaves)
PAD = "p" * 180  # brings a line to the ~535 bytes of a real results line


class FakeManifest:
    """What save_manifest_summary reads of a parsed manifest."""

    def __init__(self, path: Path, ids: list[str]):
        self.path = path
        self.items = [type("Item", (), {"id": item_id})() for item_id in ids]
        self.bad_rows: list = []


def result_line(item_id: str, n: int, fmt: str = "mp4") -> dict:
    return {
        "id": item_id,
        "key": f"{n:064x}",
        "output_key": "o" * 64,
        "output": item_relpath("videos", f"{item_id}.{fmt}", item_id, GROUPED),
        "output_bytes": 200,
        "output_sha256": "h" * 64,
        "sidecar_bytes": 900,
        "image_path": f"/data/images/{item_id}.png",
        "image_sha256": "s" * 64,
        "image_bytes": 1000,
        "image_mtime_ns": 1,
        "seed": n,
        "frames_sha256": "f" * 64,
        "seconds": 2.5,
        "finished_at": f"2026-01-01T{(n // 3600) % 24:02d}:{(n // 60) % 60:02d}:{n % 60:02d}+00:00",
        "meta_sha256": "m" * 64,
        "pad": PAD,
    }


def build_run(root: Path, items: int, failed_every: int = 100) -> list[str]:
    """A run dir of `items` rows, all but 1% done; returns the ids."""
    root.mkdir(parents=True, exist_ok=True)
    (root / LAYOUT_FILE).write_text(json.dumps({"version": GROUPED}) + "\n")
    for name in ("videos", "items", "claims", "cache", records.RECORDS_DIR):
        (root / name).mkdir(exist_ok=True)
    ids = [f"item{n:07d}" for n in range(items)]
    manifest = root / "manifest.csv"
    with manifest.open("w") as handle:
        handle.write("id,image,seed\n")
        handle.writelines(f"{item_id},/data/images/{item_id}.png,{n}\n" for n, item_id in enumerate(ids))
    (root / "config.yaml").write_text(f"manifest: {manifest}\n")
    save_manifest_summary(root / "cache", FakeManifest(manifest, ids))  # type: ignore[arg-type]
    per_writer = (items + WRITERS - 1) // WRITERS
    folder = root / records.RECORDS_DIR
    for w in range(WRITERS):
        name = f"{1767225600000 + w:013d}-bench-{1000 + w}"
        summary = summaries.Summary()
        failures = []
        with (folder / f"{name}{records.RESULTS_SUFFIX}").open("wb") as out:
            for n in range(w * per_writer, min(items, (w + 1) * per_writer)):
                if n % failed_every == failed_every - 1:
                    error = f"RuntimeError: boom {n}"
                    failures.append({"id": ids[n], "key": None, "error": error, "time": "2026-01-01T00:00:00+0000"})
                    continue
                line = (json.dumps(result_line(ids[n], n), sort_keys=True) + "\n").encode()
                out.write(line)
                if w < WRITERS - 1 or n < min(items, (w + 1) * per_writer) - STALE_TAIL:
                    summary.add(json.loads(line))
                    summary.results_bytes += len(line)
        data = "".join(json.dumps(f) + "\n" for f in failures).encode()
        (folder / f"{name}{records.FAILURES_SUFFIX}").write_bytes(data)
        summary.failures, summary.failures_bytes = len(failures), len(data)
        (folder / f"{name}{records.SUMMARY_SUFFIX}").write_bytes(summary.as_json())
    return ids


def fake_sidecar(item_id: str, n: int, output: str) -> Sidecar:
    return Sidecar(
        id=item_id,
        key=f"{n:064x}",
        output_key="o" * 64,
        seed=n,
        row=SidecarRow("manifest.csv", n + 2, item_id, f"/data/images/{item_id}.png", n, False, {}, None, {}),
        image=SidecarImage(f"/data/images/{item_id}.png", "s" * 64, None, 1000, 1, (64, 64)),
        preprocess={"resize": "crop"},
        params={"motion_bucket_id": 127, "fps": 7},
        output=SidecarOutput(output, "mp4", 7, {}, 200, "h" * 64, {}, 4, 64, 64),
        frames_sha256="f" * 64,
        timings=Timings(2.5),
        finished_at="2026-01-01T00:00:00+00:00",
        config={},
        model={"name": "fake"},
        memory={},
        oom_fallback=[],
        device="cpu",
        device_name="cpu",
        num_threads=1,
        compiled=False,
        versions={},
    )


def build_sweep(root: Path, points: int, point_items: int, shown: int = 500) -> None:
    values = ",".join(str(v) for v in range(1, points + 1))
    (root).mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text(f"hydra:\n  overrides:\n    task:\n    - conditioning.motion_bucket_id={values}\n")
    for p in range(1, points + 1):
        point = root / f"conditioning.motion_bucket_id={p}"
        ids = build_run(point, point_items)
        (point / ".hydra").mkdir(exist_ok=True)
        (point / ".hydra" / "overrides.yaml").write_text(f"- conditioning.motion_bucket_id={p}\n")
        gallery = point / "gallery"
        gallery.mkdir(exist_ok=True)
        for n, item_id in enumerate(ids[:shown]):
            if n % 100 == 99:
                continue  # failed (build_run): no files
            video = point / item_relpath("videos", f"{item_id}.mp4", item_id, GROUPED)
            video.parent.mkdir(exist_ok=True)
            video.write_bytes(b"v" * 200)
            sidecar = point / sidecar_relpath(item_id, GROUPED)
            sidecar.parent.mkdir(exist_ok=True)
            sidecar.write_bytes(fake_sidecar(item_id, n, video.relative_to(point).as_posix()).to_json())
            for suffix in (".first.jpg", ".jpg") if p == 1 else (".first.jpg",):  # made by an earlier page
                asset = point / asset_relpath(item_id, suffix)
                asset.parent.mkdir(parents=True, exist_ok=True)
                asset.write_bytes(b"jpeg")


MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mb": usage.ru_maxrss / 1024, "out": proc.stdout.decode()[-400:], "err": proc.stderr.decode()[-400:]}))
"""


def measure(label: str, command: list[str]) -> dict:
    """Run `command` in a fresh process; wall, CPU and peak RSS of it alone."""
    got = json.loads(subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True).stdout)
    wall, cpu, rss = got["wall_s"], got["cpu_s"], got["peak_rss_mb"]
    print(f"{label:<44} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak RSS {rss:7.0f} MB  rc {got['rc']}")
    if got["rc"] != 0:
        print(got["err"])
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--point-items", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="svdbatch-bench-status-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run_dir, sweep_root = root / "run", root / "sweep"
        if not (run_dir / LAYOUT_FILE).exists():
            start = time.perf_counter()
            build_run(run_dir, args.items)
            size = sum(p.stat().st_size for p in (run_dir / records.RECORDS_DIR).iterdir())
            print(f"built {args.items} items in {time.perf_counter() - start:.0f} s ({size / 2**20:.0f} MB of records)")
        if args.points and not (sweep_root / "multirun.yaml").exists():
            start = time.perf_counter()
            build_sweep(sweep_root, args.points, args.point_items)
            print(f"built a sweep of {args.points} x {args.point_items} in {time.perf_counter() - start:.0f} s")
        svdbatch = [sys.executable, "-m", "svdbatch"]
        for _ in range(args.repeat):
            measure(f"status, {args.items} items", [*svdbatch, "status", str(run_dir)])
            measure(f"status --json, {args.items} items", [*svdbatch, "status", str(run_dir), "--json"])
            if args.points:
                measure(f"status, sweep {args.points} x {args.point_items}", [*svdbatch, "status", str(sweep_root)])
                page = "import sys; from svdbatch.reports.sweep_page import write_sweep_page; write_sweep_page(sys.argv[1])"
                label = f"comparison page, sweep {args.points} x {args.point_items}"
                measure(label, [sys.executable, "-c", page, str(sweep_root)])
        report = subprocess.run([*svdbatch, "status", str(run_dir), "--json"], capture_output=True, text=True, check=True)
        print("counts:", json.loads(report.stdout)["counts"])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
