"""What a run dir is, and where one may be: recognising a folder some run wrote to, its
config files and the folder it was started from, and the folders a run must never use.
The names of its files are store.py's."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from svdbatch.rundir.store import CONFIG, OUTPUTS_ROOT, RECORDS_DIR, RUN_DIR_MARKERS, SHARD_CONFIG_GLOB


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder some svdbatch run has written to (one stat per marker)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    return (
        any((folder / name).is_file() for name in RUN_DIR_MARKERS)
        or (folder / RECORDS_DIR).is_dir()
        or any(folder.glob(SHARD_CONFIG_GLOB))
    )


def config_files(run_dir: Path) -> list[Path]:
    """config.yaml, or one config.shard-I-of-N.yaml per shard of a sharded run."""
    return sorted(run_dir.glob(CONFIG)) + sorted(run_dir.glob(SHARD_CONFIG_GLOB))


def not_a_run_dir_message(run_dir: Path) -> str:
    """The error for a path that is not a run dir, naming run dirs inside it (a sweep's folder)."""
    why = (
        "does not exist"
        if not run_dir.exists()
        else f"is not a run dir (no {', '.join(RUN_DIR_MARKERS[:-1])} or {RUN_DIR_MARKERS[-1]})"
    )
    try:
        inside = (
            sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and is_run_dir(p)) if run_dir.is_dir() else []
        )
    except OSError:  # unreadable: the message without the hint
        inside = []
    hint = f"; run dirs inside it: {', '.join(inside[:10])}{' ...' if len(inside) > 10 else ''}" if inside else ""
    return f"{run_dir} {why}{hint}"


def run_cwd(run_dir: Path) -> Path | None:
    """The directory the run was started from (Hydra records it): relative paths in the
    config (the manifest, a relative run.dir) are relative to it."""
    try:
        hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))
        return Path(hydra_cfg["hydra"]["runtime"]["cwd"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def run_dir_problem(root: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str | None:
    """Why `root` cannot be a run dir, or None. A run writes videos/, items/, logs and a
    gallery into its run dir and re-runs read it back, so it must be a folder of its own:
    not the working directory (manifest=.. once made it that), not outputs/ itself (which
    holds every run dir) and not a folder that contains the working directory."""
    here = Path(os.path.realpath(cwd if cwd is not None else os.getcwd()))
    real = Path(os.path.realpath(root))
    if real == here:
        what = "the working directory"
    elif real == here / OUTPUTS_ROOT:
        what = f"{OUTPUTS_ROOT}/ itself (the folder that holds every run dir)"
    elif real in here.parents:
        what = "a parent of the working directory"
    else:
        return None
    return (
        f"run dir {root} ({real}) is {what}; give the run a folder of its own, "
        f"e.g. run.name=myrun (-> {OUTPUTS_ROOT}/myrun) or run.dir=/path/to/new/folder"
    )
