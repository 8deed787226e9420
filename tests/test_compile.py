"""memory.compile: the UNet is compiled once per worker and warmed up outside item timings.

Uses the cheap "eager" compile backend (dynamo traces the full graph, no kernel codegen):
inductor on a CPU spends minutes generating kernels on the first call and gains nothing here.
"""

import json

import numpy as np
import torch

from svdbatch import run
from svdbatch.engine.worker import Worker
from svdbatch.models import loading as models
from svdbatch.rundir.outputs import read_video
from tests.conftest import make_cfg, write_csv

from .runfiles import sidecar_file, video_file

SMALL = ["conditioning.num_frames=2", "conditioning.num_inference_steps=1", "output=frames"]


def test_compiled_unet_warms_up_once_and_gives_the_eager_frames(tmp_path, images, monkeypatch):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], [["a", "img/a.png", 1], ["b", "img/b.png", 2]])
    calls = []
    generate = Worker.generate

    def counting(self, images, params, seeds):
        calls.append((self.loaded.compiled, [np.asarray(image).std() for image in images], list(seeds)))
        return generate(self, images, params, seeds)

    monkeypatch.setattr(Worker, "generate", counting)
    compiled_dir, eager_dir = tmp_path / "compiled", tmp_path / "eager"
    summary = run(
        make_cfg(f"manifest={manifest}", f"run.dir={compiled_dir}", "memory.compile=true", "memory.compile_backend=eager", *SMALL)
    )
    assert (summary.done, summary.failed) == (2, 0)
    (loaded,) = models._loaded.values()
    assert loaded.compiled and isinstance(loaded.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)

    # One warm-up call on a blank image (std 0, seed 0) before the items, then one call per item.
    assert [call[0] for call in calls] == [True, True, True]
    assert calls[0][1:] == ([0.0], [0])
    assert sorted(seed for call in calls[1:] for seed in call[2]) == [1, 2]
    a, b = (json.loads((sidecar_file(compiled_dir, f"{i}")).read_text()) for i in "ab")
    assert a["compiled"] is True and b["compiled"] is True
    assert a["warmup_s"] > 0 and a["warmup_s"] == b["warmup_s"]  # the worker's one warm-up, recorded

    calls.clear()
    assert run(make_cfg(f"manifest={manifest}", f"run.dir={eager_dir}", *SMALL)).done == 2
    assert [call[0] for call in calls] == [False, False]  # no warm-up without compile
    assert "warmup_s" not in json.loads((sidecar_file(eager_dir, "a")).read_text())
    for item_id in "ab":
        compiled = read_video(video_file(compiled_dir, item_id, "")).astype(int)
        eager = read_video(video_file(eager_dir, item_id, "")).astype(int)
        assert np.abs(compiled - eager).max() <= 1  # same model, same maths
