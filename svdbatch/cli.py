"""Command line: the Hydra app (`svdbatch key=value ...`, `svdbatch -m ...`) and small helpers.

    svdbatch manifest=manifests/sample.csv [group=option ...] [key=value ...]
    svdbatch -m conditioning.motion_bucket_id=60,180 manifest=...      (Hydra multirun)
    svdbatch validate manifest=... [overrides]                          (check, generate nothing)
    svdbatch manifest=some/folder run.emit_manifest=true                (write the derived manifest, stop)
    svdbatch reproduce outputs/<run>/items/<id>.json                    (regenerate one item, compare hashes)
    svdbatch status outputs/<run> [--json]                              (done / pending / failed, throughput, ETA)
    svdbatch gallery outputs/<run>                                      (rewrite <run>/index.html)
    (status and gallery of a sweep root: every point, and the comparison page)
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import ConfigError, register_configs
from .manifest import ManifestError
from .store import RunDirError
from .sweep import gallery_command, status_command  # a sweep root, else the run dir's own

log = logging.getLogger("svdbatch")

EXIT_ITEMS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # disk full / read-only mid-run: finished items are intact, run again to resume


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the input's fault: a clear message and exit 2, no traceback."""
    from .models import ModelLoadError

    return (ManifestError, ConfigError, ModelLoadError, RunDirError)


def config_dir() -> str:
    """conf/ of a source checkout (editable install), else the copy packaged in the wheel."""
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    if (source_tree / "config.yaml").is_file():
        return str(source_tree)
    return str(resources.files("svdbatch.conf"))


register_configs()
_exit_codes: list[int] = []  # one per Hydra job (several in a multirun)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_app(cfg: DictConfig) -> None:
    # torch is imported here, not at module level, so `svdbatch status` and `gallery` start fast.
    from .driver import run

    try:
        if cfg.run.emit_manifest:
            _exit_codes.append(emit_manifest(cfg))
            return
        summary = run(cfg)
    except user_errors() as exc:
        log.error("%s", exc)
        _exit_codes.append(EXIT_BAD_INPUT)
        return
    print(summary.line(), flush=True)
    _exit_codes.append(exit_code(summary))


def exit_code(summary) -> int:
    if summary.stop_reason:
        return EXIT_STOPPED
    return 0 if summary.ok else EXIT_ITEMS_FAILED


def validate(overrides: list[str]) -> int:
    """`svdbatch validate manifest=...`: check config and manifest, generate nothing."""
    from hydra import compose, initialize_config_dir

    from .driver import load_manifest

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    try:
        manifest = load_manifest(cfg)
    except (ManifestError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    for _, _, problems in manifest.bad_rows:
        for problem in problems:
            print(f"skipped (run.strict=false): {problem}", file=sys.stderr)
    print(f"{cfg.manifest}: {len(manifest.items)} valid rows, {len(manifest.bad_rows)} invalid")
    return EXIT_BAD_INPUT if manifest.bad_rows else 0


def emit_manifest(cfg: DictConfig) -> int:
    """`run.emit_manifest=true`: write the manifest the run would use (e.g. derived from a
    folder) as <run.dir>/<run.name>.csv, with explicit ids and seeds, and generate nothing.
    Running that CSV into the same run dir reproduces (and resumes) the same items."""
    from .driver import load_manifest
    from .manifest import write_manifest

    manifest = load_manifest(cfg)
    target = Path(cfg.run.dir) / f"{cfg.run.name}.csv"
    write_manifest(manifest.items, target)
    print(f"wrote {target} ({len(manifest.items)} rows); edit it, then: svdbatch manifest={target}")
    return 0


def reproduce(args: list[str]) -> int:
    from .reproduce import reproduce_command

    return reproduce_command(args)


SUBCOMMANDS = {"validate": validate, "reproduce": reproduce, "status": status_command, "gallery": gallery_command}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        try:
            sys.exit(SUBCOMMANDS[sys.argv[1]](sys.argv[2:]))
        except BrokenPipeError:  # `svdbatch status ... | head`: the reader left, not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(0)
    hydra_app()
    sys.exit(max(_exit_codes, default=0))
