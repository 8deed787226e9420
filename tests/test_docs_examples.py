"""The Python examples of docs/api.md and README.md run as written, and the README's
reproduce command finds its item: a renamed field or a moved file breaks them here first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

SAMPLE_IDS = {"sunset", "rocket", "waves"}


def python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working directory with the sample manifest, as after cloning the repository."""
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    return tmp_path


def run_examples(project: Path, doc: str) -> None:
    """Run each Python example of `doc` as written; each lists the sample's items as done."""
    blocks = python_blocks(REPO / doc)
    assert blocks, f"{doc} has no python example"
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        listed = {line.split()[0] for line in proc.stdout.splitlines() if " done " in line}
        assert listed == SAMPLE_IDS, proc.stdout


def test_the_api_guide_example_runs_as_written(project):
    run_examples(project, "docs/api.md")


def test_the_readme_example_runs_and_reproduce_takes_a_run_dir_and_an_id_or_the_flat_sidecar_path(project):
    run_examples(project, "README.md")  # writes outputs/api-demo
    run_dir = "outputs/api-demo"
    by_id = run_cli("reproduce", run_dir, "rocket", cwd=project)
    assert by_id.returncode == 0 and "rocket: frames match" in by_id.stdout, by_id.stderr[-2000:]
    # The path older docs (and run dirs of the flat layout) show: the item is found in its bucket.
    flat = run_cli("reproduce", f"{run_dir}/items/rocket.json", cwd=project)
    assert flat.returncode == 0 and "rocket: frames match" in flat.stdout, flat.stderr[-2000:]
    missing = run_cli("reproduce", run_dir, "nosuchid", cwd=project)
    assert missing.returncode == 2 and "nosuchid" in missing.stderr
