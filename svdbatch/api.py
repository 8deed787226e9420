"""The public Python API: what the CLI, notebooks, pipelines and the tests call.

    cfg = svdbatch.compose("manifest=manifests/sample.csv", "run.name=demo")
    svdbatch.validate(cfg)                    # every problem of config and manifest, nothing generated
    summary = svdbatch.run(cfg)               # RunSummary: run_dir, done / skipped / failed / invalid
    svdbatch.status(summary.run_dir)          # the dict `svdbatch status --json` prints
    for item in svdbatch.open_run(summary.run_dir):
        print(item.id, item.status, item.video, item.seed, item.params)
    svdbatch.verify(summary.run_dir, repair=False)
    svdbatch.reproduce(summary.run_dir / "items" / "rocket.json")
    for scored in svdbatch.score(["videos/"], rules={"min_motion": 0.5}):
        print(scored.path, scored.signals, scored.dud)

Each function returns data and raises the errors of core/errors.py for bad input; printing
and exit codes are the CLI's business (cli.py). Importing this module imports neither torch
nor Hydra: a run imports torch in its worker processes, `compose` imports Hydra.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from svdbatch.core.compose import config_dir
from svdbatch.core.config import Config
from svdbatch.core.config_checks import check_schema, run_config
from svdbatch.core.errors import ConfigError, RunDirError
from svdbatch.core.quality import QualityConfig, check_quality
from svdbatch.engine import driver
from svdbatch.engine.prepare import load_manifest
from svdbatch.engine.shards import resolve_shard
from svdbatch.engine.summary import RunSummary
from svdbatch.inputs.manifest_formats import csv_holds, write_manifest
from svdbatch.reports import status as run_status
from svdbatch.reports.sweep_root import is_sweep_root, point_dirs
from svdbatch.reports.sweep_status import collect_sweep
from svdbatch.rundir import records
from svdbatch.rundir.intact import output_intact
from svdbatch.rundir.layout import SIDECARS_DIR, sidecar_path_in
from svdbatch.rundir.run_dirs import is_run_dir, not_a_run_dir_message
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarError
from svdbatch.rundir.store import is_invalid_record
from svdbatch.rundir.verify import ItemReport, check_exports, set_aside, unrecorded_outputs, verify_run_dir

if TYPE_CHECKING:
    from svdbatch.engine.reproduce import Reproduction
    from svdbatch.reports.score import Scored

__all__ = [
    "ItemRecord",
    "RunSummary",
    "Validation",
    "VerifyReport",
    "Emitted",
    "compose",
    "emit_manifest",
    "open_run",
    "reproduce",
    "run",
    "score",
    "status",
    "validate",
    "verify",
]


def compose(*overrides: str) -> DictConfig:
    """The run config from conf/ and Hydra-style overrides, as `svdbatch key=value ...` builds it.

    Typed and checked against the schema as a run's is: an unknown key (also one added with
    `+`/`++`) raises ConfigError naming it, a value of the wrong type Hydra's error. Outside a
    Hydra job there is no job folder, so `run.dir` defaults to `outputs/<run.name>` (what the
    CLI's default `hydra.run.dir` gives) unless an override sets it."""
    from hydra import compose as hydra_compose  # Hydra is imported only by what composes
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    check_schema(cfg)
    if not OmegaConf.is_missing(cfg, "manifest") and not any(o.lstrip("+~").startswith("run.dir=") for o in overrides):
        cfg.run.dir = str(Path("outputs") / str(cfg.run.name))
    return cfg


def run(config: DictConfig | Config) -> RunSummary:
    """Generate every item of the manifest that is not done yet into `config.run.dir`.

    `config` is what `compose` returns (edit it freely first), or a Config. It is turned into
    the typed Config dataclass here, once; the engine reads only that. Returns the summary
    (counts done / reused / skipped / failed / invalid / busy, why it stopped early if it
    did). Bad input raises before anything is generated."""
    return driver.run(run_config(config))


@dataclass
class Validation:
    """What `validate` found: the rows a run would generate and the rows it would refuse."""

    manifest: str
    valid: int
    invalid: list[tuple[int, str | None, list[str]]] = field(default_factory=list)  # (line, id, problems)
    other_rows: int = 0  # rows of other shards (run.shard or the launcher's): read, not validated, as a run does
    shard: tuple[int, int] = (0, 1)  # (index, count)

    @property
    def ok(self) -> bool:
        return not self.invalid


def validate(config: DictConfig | Config) -> Validation:
    """Check the config and every manifest row as a run would, generating nothing.

    A strict run's bad rows raise ManifestError (every problem, with file, row and field);
    with run.strict=false they are returned in `invalid`. Sharded (run.shard, or a launcher's
    environment), only the shard's rows are validated, exactly as its run does."""
    config = run_config(config)
    shard = resolve_shard(config.run.shard.index, config.run.shard.count, driver.in_hydra_sweep())
    manifest = load_manifest(config, shard)
    bad = [(line, item_id, [str(p) for p in problems]) for line, item_id, problems in manifest.bad_rows]
    return Validation(str(config.manifest), len(manifest.items), bad, manifest.other_rows, (shard.index, shard.count))


@dataclass
class Emitted:
    """What `emit_manifest` wrote."""

    path: Path
    rows: int
    renamed: list[tuple[int, str, str]]  # (line, image, new id): derived ids that collided
    left_out: list[str]  # problems of the invalid rows left out (run.strict=false)


def emit_manifest(config: DictConfig | Config) -> Emitted:
    """Write the manifest a run would use (e.g. derived from a folder) as
    <run.dir>/<run.name>.csv with explicit ids and seeds (.jsonl when a meta_* value is not
    plain text: a CSV cell would lose its type). Every valid row comes out: image paths whose
    derived ids collide get unique ids. Running the emitted file into the same run dir
    reproduces (and resumes) the same items."""
    config = run_config(config)
    manifest = load_manifest(config, unique_ids=True)
    suffix = ".csv" if csv_holds(manifest.items) else ".jsonl"
    target = Path(config.run.dir) / f"{config.run.name}{suffix}"
    write_manifest(manifest.items, target)
    left_out = [str(problem) for _, _, problems in manifest.bad_rows for problem in problems]
    return Emitted(target, len(manifest.items), list(manifest.renamed), left_out)


def status(path: str | os.PathLike) -> dict[str, Any]:
    """Progress of a run dir (or of every point of a sweep root): the object `svdbatch status
    --json` prints (counts, failure reasons, throughput, ETA, liveness)."""
    path = Path(path)
    if is_sweep_root(path) and point_dirs(path):
        return collect_sweep(path)
    _require_run_dir(path)
    return run_status.collect(path)


@dataclass
class VerifyReport:
    run_dir: Path
    items: list[ItemReport]
    unrecorded_outputs: list[str]
    stale_exports: list[str] = field(default_factory=list)  # what metadata.jsonl / the shards list that is not finished
    exports_rewritten: list[str] = field(default_factory=list)  # repair: the stale exports it rewrote
    set_aside_in: Path | None = None  # repair: where the damaged items went
    busy: list[str] = field(default_factory=list)  # repair: left alone, another process holds them

    @property
    def damaged(self) -> list[ItemReport]:
        return [r for r in self.items if r.damaged]


def verify(run_dir: str | os.PathLike, repair: bool = False) -> VerifyReport:
    """Check every finished item byte for byte against its sidecar and results line; with
    `repair`, set damaged items aside (the next run redoes them). Also checks that
    metadata.jsonl and the WebDataset shards list only finished items (`stale_exports`);
    `repair` rewrites them."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    items = verify_run_dir(run_dir)
    report = VerifyReport(run_dir, items, unrecorded_outputs(run_dir))
    if repair and report.damaged:
        report.set_aside_in, report.busy = set_aside(run_dir, report.damaged)  # rewrites the exports too
    report.stale_exports, report.exports_rewritten = check_exports(run_dir, repair)
    return report


def reproduce(sidecar: str | os.PathLike, item_id: str | None = None) -> Reproduction:
    """Regenerate one item from its sidecar alone and compare the frames hash (`matches`).
    `sidecar`: the item's sidecar file, or its run dir with `item_id`. It loads the model
    here, in this process: the only function of this module that imports torch, and only
    when called."""
    from svdbatch.engine.reproduce import reproduce as reproduce_item

    return reproduce_item(find_sidecar(Path(sidecar), item_id))


def find_sidecar(path: Path, item_id: str | None = None) -> Path:
    """The sidecar of `item_id` in the run dir `path`, or `path` itself. `<run dir>/items/<id>.json`
    (the flat form of older run dirs) finds the item in either layout."""
    if item_id is not None:
        return sidecar_path_in(path, item_id)
    if not path.exists() and path.parent.name == SIDECARS_DIR and is_run_dir(path.parent.parent):
        return sidecar_path_in(path.parent.parent, path.stem)
    return path


def score(paths: Iterable[str | os.PathLike], rules: dict[str, Any] | None = None) -> Iterator[Scored]:
    """The quality signals of video files and folders (a run dir: its videos), made by
    svdbatch or not, one `Scored` per video in order (docs/quality.md). `rules`: quality
    settings (`{"min_motion": 0.5, "max_black_frames": 0}`, the `quality` group's keys) that
    each video is judged by (`Scored.verdict`, `.dud`); an unknown key or a bad value raises
    ConfigError naming it. A file that cannot be decoded is yielded with `error` set, and the
    rest go on. Imports OpenCV when called, never at `import svdbatch`."""
    quality = quality_rules(rules or {})
    from svdbatch.reports.score import score_paths  # OpenCV: only for scoring

    return score_paths(paths, quality)


def quality_rules(rules: dict[str, Any]) -> QualityConfig | None:
    """A QualityConfig from `rules` (the quality group's keys), checked as a run checks it."""
    if not rules:
        return None
    known = {f.name for f in fields(QualityConfig)} - {"name"}
    unknown = sorted(set(rules) - known)
    if unknown:
        raise ConfigError(f"invalid rules:\n  quality.{unknown[0]}: unknown key; known: {', '.join(sorted(known))}")
    quality = QualityConfig(**rules)
    problems = check_quality(quality)
    if problems:
        raise ConfigError("invalid rules:\n  " + "\n  ".join(problems))
    return quality


@dataclass(frozen=True)
class ItemRecord:
    """One item of a run dir as a typed record."""

    id: str
    status: str  # "done", "failed" or "invalid" (a manifest row refused with run.strict=false)
    video: Path | None  # the output (file or frames folder); None unless done
    seed: int | None
    params: dict[str, Any]  # the generation parameters it was (or was to be) made with
    sidecar: Path | None  # its sidecar (items/<bucket>/<id>.json); None unless done
    error: str | None = None  # why it failed


def open_run(path: str | os.PathLike) -> Iterator[ItemRecord]:
    """Every item of a run dir that is finished, failed or refused, in the order they were
    recorded: done items (output intact) from their sidecars, then failures and invalid rows
    from the failure records (an item that failed once and is done now is only listed as done)."""
    run_dir = Path(path)
    _require_run_dir(run_dir)
    done = records.latest_results(run_dir)
    for item_id, record in done.items():
        if not output_intact(run_dir, record):
            continue
        sidecar_path = sidecar_path_in(run_dir, item_id)
        try:
            sidecar = Sidecar.read(sidecar_path)
        except (OSError, SidecarError):
            continue
        yield ItemRecord(item_id, "done", run_dir / sidecar.output.path, sidecar.seed, dict(sidecar.params), sidecar_path)
    for item_id, record in records.latest_failures(run_dir).items():
        if item_id in done:
            continue
        if is_invalid_record(record):  # a manifest row that validation refused (run.strict=false)
            yield ItemRecord(item_id, "invalid", None, None, {}, None, "; ".join(record.get("problems") or []))
            continue
        yield ItemRecord(item_id, "failed", None, record.get("seed"), dict(record.get("params") or {}), None, record.get("error"))


def _require_run_dir(path: Path) -> None:
    if not is_run_dir(path):
        raise RunDirError(not_a_run_dir_message(path))
