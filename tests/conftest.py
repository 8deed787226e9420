"""Shared fixtures: a per-session tiny-model cache, small images, manifests and config helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import svdbatch

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CSV = REPO / "manifests" / "sample.csv"

# Small enough that one item takes a fraction of a second on 2 CPU cores.
FAST = [
    "conditioning.width=64",
    "conditioning.height=64",
    "conditioning.num_frames=4",
    "conditioning.num_inference_steps=2",
]


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory) -> Path:
    """Build the tiny model once per session, in a private cache (also seen by subprocesses)."""
    cache = tmp_path_factory.mktemp("svdbatch-cache")
    os.environ["SVDBATCH_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


def make_image(path: Path, size=(80, 64), seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    return {name: make_image(tmp_path / "img" / f"{name}.png", seed=i) for i, name in enumerate(["a", "b", "c", "d"])}


@pytest.fixture
def manifest4(tmp_path, images) -> Path:
    """Four rows: explicit seeds, one derived seed, per-row overrides."""
    return write_csv(
        tmp_path / "m.csv",
        ["id", "image", "seed", "motion_bucket_id", "fps"],
        [
            ["a", "img/a.png", 1, None, None],
            ["b", "img/b.png", 2, 30, None],
            ["c", "img/c.png", None, None, 9],
            ["d", "img/d.png", 4, 200, 5],
        ],
    )


def make_cfg(*overrides: str, fast: bool = True):
    """The composed config exactly as the CLI would build it (minus hydra's own keys); an
    unknown key (`+run.seeed=1`) raises ConfigError, as a run refuses it."""
    return svdbatch.compose(*(FAST if fast else []), *overrides)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "svdbatch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
