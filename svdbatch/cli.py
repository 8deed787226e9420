"""Command line: the Hydra app (`svdbatch key=value ...`, `svdbatch -m ...`) and small helpers.

    svdbatch manifest=manifests/sample.csv [group=option ...] [key=value ...]
    svdbatch -m conditioning.motion_bucket_id=60,180 manifest=...      (Hydra multirun)
    svdbatch validate manifest=... [overrides]                          (check, generate nothing)
    svdbatch manifest=some/folder run.emit_manifest=true                (write the derived manifest, stop)
    svdbatch reproduce outputs/<run> <id>                               (regenerate one item, compare hashes)
    svdbatch status outputs/<run> [--json]                              (done / pending / failed, throughput, ETA)
    svdbatch gallery outputs/<run>                                      (rewrite <run>/index.html)
    svdbatch verify outputs/<run> [--json] [--repair]                   (check every finished file; set damaged ones aside)
    svdbatch score PATH... [--rule min_motion=0.5 ...]                  (quality signals of any videos, JSON lines)
    (status and gallery of a sweep root: every point, and the comparison page)

Exit codes live in core/errors.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from svdbatch import api
from svdbatch.commands import SUBCOMMANDS
from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.compose import config_dir
from svdbatch.core.config import Config
from svdbatch.core.config_checks import run_config
from svdbatch.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    USER_ERRORS,
    exit_code_for_signal,
)
from svdbatch.core.jsonl import to_json
from svdbatch.core.process import own_process

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from hydra.core.utils import JobReturn
    from omegaconf import DictConfig

log = logging.getLogger("svdbatch")


_exit_codes: list[int] = []  # one per Hydra job this process knows of (several in a multirun)
_jobs_started: list[bool] = []  # Hydra composed a config and called the app at least once

OUTCOMES_FOLDER = ".svdbatch-jobs"  # in a multirun's sweep dir: one JobSummary file per job


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class JobSummary:
    """What one Hydra job hands back: its summary line, run dir and exit code."""

    job: int | None
    run_dir: str
    line: str
    exit_code: int
    process: str = field(default_factory=this_process)  # who ran it


class JobOutcomes:
    """The Hydra callback (conf/config.yaml, hydra.callbacks) that brings each job's
    JobSummary back to the process that launched a multirun. hydra.main drops a sweep's
    return values, and under the submitit launchers each job runs in another process, maybe
    on another host, with its stdout in .submitit/*_log.out. So each job writes its summary
    into the sweep dir (a shared filesystem, as submitit requires), and at the sweep's end
    the launching process prints one line per job run elsewhere, exits with the worst code
    and removes the files. Jobs run in the launching process (Hydra's basic launcher) write
    nothing: run_job has already counted them. The methods are the whole of
    hydra.experimental.callback.Callback's interface (Hydra calls them by name); not
    subclassing it keeps Hydra out of `import svdbatch.cli`."""

    def __init__(self) -> None:
        # The process that launched the multirun (pickled with the launcher by submitit).
        self.launcher: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        pass

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        pass

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        pass

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.launcher = this_process()
        shutil.rmtree(outcomes_folder(config), ignore_errors=True)  # an earlier sweep's jobs

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        summary = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        multirun = config.hydra.mode == RunMode.MULTIRUN
        if isinstance(summary, JobSummary) and summary.process != self.launcher and multirun:
            folder = outcomes_folder(config)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / f"{config.hydra.job.num}.json", to_json(asdict(summary)).encode())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = outcomes_folder(config)
        elsewhere = read_job_summaries(folder)
        shutil.rmtree(folder, ignore_errors=True)  # read: the sweep dir keeps only the jobs' own output
        for summary in elsewhere:
            print(f"job {summary.job}: {summary.line}", flush=True)
        _exit_codes.extend(summary.exit_code for summary in elsewhere)


def outcomes_folder(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir).absolute() / OUTCOMES_FOLDER


def read_job_summaries(folder: Path) -> list[JobSummary]:
    """The summaries the jobs of a multirun wrote, in job order."""
    paths = sorted(folder.glob("*.json"), key=lambda p: int(p.stem)) if folder.is_dir() else []
    return [JobSummary(**json.loads(path.read_text())) for path in paths]


def job_number() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    # Hydra annotates JobConf as a dataclass; it is a DictConfig at run time.
    return cast("DictConfig", HydraConfig.get().job).get("num") if HydraConfig.initialized() else None


def hydra_app() -> None:
    """The run (or sweep) as Hydra runs it, from sys.argv. Hydra is imported here, not at
    module level, so that `status`, `gallery` and `verify` start fast."""
    import hydra

    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(run_job)()


def run_job(cfg: DictConfig) -> JobSummary:
    """One Hydra job: a run, or a sweep point (module level: submitit pickles it by name)."""
    _jobs_started.append(True)
    try:
        # Before any key is read: `+run.seeed=1` is refused, not ignored. From here on the
        # config is the typed Config dataclass, run.dir resolved in this Hydra job.
        config = run_config(cfg)
        if config.run.emit_manifest:
            code = emit_manifest(config)
            _exit_codes.append(code)
            return JobSummary(job_number(), config.run.dir, f"wrote the manifest into {config.run.dir}", code)
        summary = api.run(config)
    except USER_ERRORS as exc:
        log.error("%s", exc)
        _exit_codes.append(EXIT_BAD_INPUT)
        return JobSummary(job_number(), str(cfg.run.dir), f"svdbatch: not run: {str(exc).splitlines()[0]}", EXIT_BAD_INPUT)
    print(summary.line(), flush=True)
    if summary.interrupted_by is not None:
        # Under submitit this checkpoints and requeues the job (and exits); otherwise it is
        # a no-op. Then end the whole process, sweep included: the user asked to stop.
        assert summary.pass_on is not None  # set with interrupted_by (summary.settle_interrupted)
        summary.pass_on()
        sys.exit(exit_code(summary))
    _exit_codes.append(exit_code(summary))
    return JobSummary(job_number(), str(summary.run_dir), summary.line(), exit_code(summary))


def exit_code(summary: api.RunSummary) -> int:
    if summary.interrupted_by is not None:
        return exit_code_for_signal(summary.interrupted_by)
    if summary.stop_reason:
        return EXIT_STOPPED
    return 0 if summary.ok else EXIT_ITEMS_FAILED


def emit_manifest(config: Config) -> int:
    """`run.emit_manifest=true`: write the manifest the run would use, generate nothing."""
    emitted = api.emit_manifest(config)
    for line, image, new_id in emitted.renamed:
        print(f"  line {line}: {image}: its derived id collides with an earlier row's; written with id {new_id!r}")
    for problem in emitted.left_out:
        print(f"left out (run.strict=false): {problem}", file=sys.stderr)
    renamed = f", {len(emitted.renamed)} rows given new ids" if emitted.renamed else ""
    print(f"wrote {emitted.path} ({emitted.rows} rows{renamed}); edit it, then: svdbatch manifest={emitted.path}")
    return EXIT_BAD_INPUT if emitted.left_out else EXIT_OK


HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i"}
# A command line with one of these runs nothing here (or runs its jobs in other processes).
# Options that can bring in a config that sets `manifest` (so its absence is not an error yet).
CONFIG_OPTIONS = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c"}


def usage() -> str:
    """Short usage, the subcommands listed from SUBCOMMANDS (their docstrings' first line)."""
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: svdbatch manifest=PATH [group=option ...] [key=value ...]   run (Hydra app; -m for a sweep)",
        "       svdbatch SUBCOMMAND [--help] ...",
        "",
        "subcommands:",
    ]
    for name, command in SUBCOMMANDS.items():
        summary = (command.__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<{width}}  {summary[0] if summary else ''}")
    lines += [
        "",
        "svdbatch --help lists the config groups and every key; docs: README.md, docs/stops.md.",
        "exit codes: 0 all done, 1 items failed, 2 bad input, 3 stopped (disk full), 128+N stopped by signal N.",
    ]
    return "\n".join(lines)


def manifest_missing(args: list[str]) -> bool:
    """True if nothing on the command line can set `manifest`: Hydra would fail later with
    an unreadable error while naming the output folder after it."""
    if any(arg.split("=", 1)[0] in CONFIG_OPTIONS or arg.startswith("+") for arg in args):
        return False
    return not any(re.match(r"^~?manifest=", arg) for arg in args)


def show_resolved_hydra_config(argv: list[str]) -> bool:
    """`svdbatch ... --cfg hydra --resolve`: Hydra drops the job's keys before it resolves its
    own node, so hydra.run.dir (outputs/${run.name}) cannot resolve there. Print the hydra
    part of `--cfg all --resolve` instead, which resolves both together. False: not such a
    command."""
    import contextlib
    import io

    import yaml

    # Hydra's own parser of its flags: it has no public equivalent, and a copy would drift.
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return False  # let Hydra report the bad command line itself
    if args.cfg != "hydra" or not args.resolve or args.multirun:
        return False
    rewritten, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--cfg", "-c"):
            rewritten += ["--cfg", "all"]
            skip = True  # its value, "hydra"
        elif token in ("--cfg=hydra", "-chydra"):
            rewritten += ["--cfg", "all"]
        else:
            rewritten.append(token)
    program, sys.argv = sys.argv[0], [sys.argv[0], *rewritten]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            hydra_app()
    finally:
        sys.argv[0] = program
    whole = yaml.safe_load(printed.getvalue()) or {}
    print(OmegaConf.to_yaml({"hydra": whole.get("hydra", {})}), end="")
    return True


def sweep_points(overrides: list[Override]) -> list[list[str]]:
    """The command lines of a basic sweep's points, in the order Hydra's basic sweeper runs
    them (the cartesian product, the first override varying slowest)."""
    choices = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [str(o.input_line)]
        for o in overrides
    ]
    return [list(point) for point in itertools.product(*choices)]


def show_sweep_config(argv: list[str]) -> bool:
    """`svdbatch -m a=1,2 ... --cfg job [--resolve]` (or `--info`): Hydra refuses to combine
    --multirun with --cfg/--info, yet "what will each sweep point run, and where?" is the
    question before a sweep. Print each point's config in turn, as one YAML document per
    point, composed exactly as the sweep would compose it (hydra.mode=MULTIRUN and the
    point's hydra.job.num, so run.dir is that point's folder). False: not such a command."""
    # Hydra's own parser of its flags: it has no public equivalent, and a copy would drift.
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return False  # let Hydra report the bad command line itself
    if not args.multirun or not (args.cfg or args.info):
        return False
    flags = [token for token in argv if token not in ("-m", "--multirun") and token not in args.overrides]
    points = sweep_points(OverridesParser.create().parse_overrides(args.overrides))
    program = sys.argv[0]
    for number, point in enumerate(points):
        if args.cfg:
            print(f"--- # sweep point {number}: {' '.join(point)}", flush=True)
        sys.argv = [program, *flags, *point, "hydra.mode=MULTIRUN", f"hydra.job.num={number}"]
        hydra_app()
    return True


def main() -> None:
    own_process()  # this process is svdbatch's: its environment defaults, before torch loads anywhere
    args = sys.argv[1:]
    if args and args[0] in SUBCOMMANDS:
        try:
            sys.exit(SUBCOMMANDS[args[0]](args[1:]))
        except BrokenPipeError:  # `svdbatch status ... | head`: the reader left, not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(EXIT_OK)
    if not args:
        print(usage(), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if HELP_FLAGS & set(args):
        if "--help" in args or "-h" in args:
            print(usage() + "\n")  # then Hydra's own help: config groups and keys
        elif show_sweep_config(args):  # -m ... --info
            sys.exit(EXIT_OK)
    elif show_sweep_config(args) or show_resolved_hydra_config(args):  # -m ... --cfg job
        sys.exit(EXIT_OK)
    elif manifest_missing(args):
        print("svdbatch: missing manifest=PATH (a CSV/JSONL manifest, an image or a folder of images)\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        hydra_app()
    except SystemExit as exc:
        # Hydra reports a config it cannot compose (unknown key, wrong type, unknown preset)
        # in one message and exits 1, which here means "items failed".
        if exc.code == 1 and not _jobs_started:
            sys.exit(EXIT_BAD_INPUT)
        raise
    except KeyboardInterrupt:  # Ctrl-C before the run installed its own handler (composing, importing)
        print("interrupted; run the same command to resume", file=sys.stderr)
        sys.exit(exit_code_for_signal(signal.SIGINT))
    sys.exit(max(_exit_codes, default=EXIT_OK))
