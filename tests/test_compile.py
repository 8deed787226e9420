"""memory.compile: the UNet is compiled once per worker and warmed up outside item timings.

Uses the cheap "eager" compile backend (dynamo traces the full graph, no kernel codegen):
inductor on a CPU spends minutes generating kernels on the first call and gains nothing here.
"""

import json

from svdbatch.driver import run
from tests.conftest import make_cfg, write_csv


def test_compiled_unet_warms_up_once_and_reports_it_separately(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2]])
    run_dir = tmp_path / "run"
    summary = run(
        make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "memory.compile=true", "memory.compile_backend=eager",
                 "conditioning.num_frames=2", "conditioning.num_inference_steps=1")
    )
    assert (summary.done, summary.failed) == (2, 0)
    a, b = (json.loads((run_dir / "items" / f"{i}.json").read_text()) for i in "ab")
    assert a["compiled"] is True and a["warmup_s"] > 0
    assert a["warmup_s"] == b["warmup_s"]  # one warm-up for the worker, not one per item
    assert a["timings"]["generate_s"] < a["warmup_s"]  # the compile cost is not in the item's time
