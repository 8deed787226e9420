"""Importing svdbatch, and calling it, leaves the caller's process-wide state alone:
os.environ, Pillow's decompression-bomb limit, csv's field limit, warning filters. Its own
limits apply per call; its environment defaults only in the processes it owns."""

from __future__ import annotations

import json
import subprocess
import sys

from svdbatch.core.process import WORKER_ENV, worker_env
from tests.conftest import REPO

SNAPSHOT = """
import csv, json, os, socket, sys, warnings, logging
import PIL.Image
def snapshot():
    return {
        "environ": dict(os.environ),
        "pil_max_pixels": PIL.Image.MAX_IMAGE_PIXELS,
        "csv_field_limit": csv.field_size_limit(),
        "warning_filters": [repr(f) for f in warnings.filters],
        "socket_timeout": socket.getdefaulttimeout(),
        "root_logger": [logging.getLogger().level, len(logging.getLogger().handlers)],
    }
"""

IMPORT_ALL = (
    SNAPSHOT
    + """
import importlib, pkgutil
# The libraries svdbatch builds on set their own warning filters on import: imported first,
# so only what svdbatch itself changes shows.
# OpenCV (core/measure.py) points LD_LIBRARY_PATH at its bundled libraries on import.
import accelerate, cv2, diffusers, hydra, imageio, numpy, omegaconf, ray, torch, transformers  # noqa: F401
csv.field_size_limit(1000)  # a caller's own settings, which must survive
PIL.Image.MAX_IMAGE_PIXELS = 12345
before = snapshot()
import svdbatch
names = sorted(m.name for m in pkgutil.walk_packages(svdbatch.__path__, "svdbatch."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"names": names, "before": before, "after": snapshot()}))
"""
)


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_svdbatch_module_changes_no_process_wide_state():
    result = run_python(IMPORT_ALL)
    assert {
        "svdbatch.cli",
        "svdbatch.inputs.images",
        "svdbatch.inputs.manifest",
        "svdbatch.engine.worker",
        "svdbatch.engine.ray_engine",
        "svdbatch.engine.ray_connection",
    } <= set(result["names"])
    before, after = result["before"], result["after"]
    assert after["environ"] == before["environ"]  # no OMP_WAIT_POLICY slipped into the caller's
    assert after["pil_max_pixels"] == 12345 and after["csv_field_limit"] == 1000
    assert after == before


def test_reading_a_manifest_and_checking_images_leaves_the_callers_limits(tmp_path):
    """svdbatch's own limits (16 MiB CSV cells, run.max_image_pixels) hold during its calls
    and are gone after: the caller's csv limit and Pillow limit are untouched."""
    (tmp_path / "img").mkdir()
    code = (
        SNAPSHOT
        + f"""
import numpy as np
from PIL import Image
from svdbatch.inputs.images import ImageProblem, open_image
from svdbatch.inputs.manifest import read_manifest
root = {str(tmp_path)!r}
Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(root + "/img/a.png")
with open(root + "/m.csv", "w") as handle:
    handle.write("image,meta_note\\nimg/a.png," + "x" * 300000 + "\\n")  # > csv's default 131072
before = snapshot()
manifest = read_manifest(root + "/m.csv")
assert len(manifest.items) == 1 and len(manifest.items[0].meta["meta_note"]) == 300000
PIL.Image.MAX_IMAGE_PIXELS = 1000  # a caller's strict limit: svdbatch applies its own instead
try:
    open_image(root + "/img/a.png", max_pixels=5000)
    raise SystemExit("refused nothing")
except ImageProblem as exc:
    assert "80x64 = 5,120 pixels, more than run.max_image_pixels (5,000)" in str(exc)
open_image(root + "/img/a.png", max_pixels=None).close()  # allowed, though Pillow's limit says no
PIL.Image.MAX_IMAGE_PIXELS = before["pil_max_pixels"]
print(json.dumps({{"before": before, "after": snapshot()}}))
"""
    )
    result = run_python(code)
    assert result["after"] == result["before"]


def test_worker_processes_get_the_environment_defaults_a_set_value_wins():
    assert worker_env({}) == WORKER_ENV == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert worker_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    # The CLI's own process sets them before anything imports torch (its workers inherit them).
    code = (
        "import os, sys, json; os.environ.pop('OMP_WAIT_POLICY', None); sys.argv = ['svdbatch', 'status', '--help']\n"
        "from svdbatch.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY')}))"
    )
    assert run_python(code)["omp"] == "PASSIVE"
