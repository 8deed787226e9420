"""The subcommands: `svdbatch validate|reproduce|status|gallery|verify|score ...`.

Each one parses its arguments (argparse), calls the public API (api.py), prints, and returns
an exit code (core/errors.py); cli.main dispatches to them by name (SUBCOMMANDS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from svdbatch import api
from svdbatch.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    SHOWN_PROBLEMS,
    USER_ERRORS,
    CannotReproduce,
    ConfigError,
    ManifestError,
    RunDirError,
    problems_summary,
)
from svdbatch.core.quality import SIGNALS
from svdbatch.reports import gallery as gallery_page
from svdbatch.reports.status import format_report
from svdbatch.reports.sweep_page import write_sweep_page
from svdbatch.reports.sweep_root import is_sweep_root, point_dirs
from svdbatch.reports.sweep_status import format_sweep_report
from svdbatch.rundir.run_dirs import is_run_dir, not_a_run_dir_message


def validate(args: list[str]) -> int:
    """check a manifest and the config, generate nothing"""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = argparse.ArgumentParser(
        prog="svdbatch validate",
        description=validate.__doc__,
        epilog="example: svdbatch validate manifest=manifests/sample.csv conditioning=svd_xt",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the same overrides as a run (manifest=... required)")
    parser.add_argument(
        "--all", action="store_true", help=f"list every problem (default: the first {SHOWN_PROBLEMS} and a count)"
    )
    options = parser.parse_args(args)
    overrides = options.overrides
    shown = None if options.all else SHOWN_PROBLEMS
    try:
        cfg = api.compose(*overrides)
        cfg.manifest  # noqa: B018  (a missing manifest fails here, with the key's name)
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        print(f"svdbatch validate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = api.validate(cfg)
    except ManifestError as exc:
        lines = problems_summary(exc.problems, shown, rest="--all lists every one")
        print("\n".join([f"{len(exc.problems):,} problem(s) in the manifest:", *lines]), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    skipped = [f"skipped (run.strict=false): {problem}" for _, _, problems in result.invalid for problem in problems]
    for line in problems_summary(skipped, shown, rest="--all lists every one"):
        print(line.strip(), file=sys.stderr)
    index, count = result.shard
    shard = f" (shard {index} of {count}; {result.other_rows:,} rows left to the other shards)" if count > 1 else ""
    print(f"{result.manifest}: {result.valid:,} valid rows, {len(result.invalid):,} invalid{shard}")
    return EXIT_OK if result.ok else EXIT_BAD_INPUT


def reproduce(args: list[str]) -> int:
    """regenerate one item from its sidecar and compare the frames hash"""
    parser = argparse.ArgumentParser(
        prog="svdbatch reproduce",
        description="regenerate one item from its sidecar alone and compare the frames hash",
        epilog="exit status: 0 the frames match, 1 they differ, 2 the item cannot be re-run as recorded",
    )
    parser.add_argument("sidecar", type=Path, help="the item's sidecar file, or its run dir followed by ITEM_ID")
    parser.add_argument("item_id", nargs="?", metavar="ITEM_ID", help="the item's id, when the first argument is a run dir")
    options = parser.parse_args(args)  # a bad command line exits 2, like an item that cannot be re-run
    try:
        result = api.reproduce(options.sidecar, options.item_id)
    except (CannotReproduce,) + USER_ERRORS as exc:  # the same tuple; mypy rejects *unpacking in except
        print(f"svdbatch reproduce: cannot reproduce: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in result.notes:
        print(f"  note: {note}", file=sys.stderr)
    if result.matches:
        print(f"{result.item_id}: frames match the sidecar (sha256 {result.got})")
    else:
        print(f"{result.item_id}: frames DIFFER: recorded sha256 {result.recorded}, got {result.got}")
    print(f"{result.item_id}: {result.file_report}")
    return EXIT_OK if result.matches and result.file_ok is not False else EXIT_ITEMS_FAILED


def status(args: list[str]) -> int:
    """done / in progress / failed / pending counts, failure reasons, throughput, ETA (a run dir or a sweep root)"""
    parser = argparse.ArgumentParser(prog="svdbatch status", description="counts of a run dir, or of every point of a sweep root")
    parser.add_argument("path", type=Path, help="a run dir, or a sweep root (every point and the total)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    options = parser.parse_args(args)
    try:
        report = api.status(options.path)
    except RunDirError as exc:
        print(f"svdbatch status: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if options.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_sweep_report(report) if "points" in report else format_report(report))
    return EXIT_OK


def gallery(args: list[str]) -> int:
    """rewrite <run dir>/index.html, the contact sheet (a sweep root: the comparison page)"""
    parser = argparse.ArgumentParser(prog="svdbatch gallery", description="rewrite <run dir or sweep root>/index.html")
    parser.add_argument("path", type=Path, help="a run dir, or a sweep root (its comparison page)")
    add_view_options(parser)  # a run dir's page takes them; a sweep page shows every cell
    options = parser.parse_args(args)
    path = options.path
    if is_sweep_root(path) and point_dirs(path):
        print(write_sweep_page(path, options.max_items))
        if not is_run_dir(path):
            return EXIT_OK
    # A run dir (also a sweep root that is a run dir of its own): its contact sheet.
    if not is_run_dir(path):
        print(f"svdbatch gallery: {not_a_run_dir_message(path)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        where = tuple(gallery_page.parse_condition(text) for text in options.where)
    except ValueError as exc:
        print(f"svdbatch gallery: --where {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(gallery_page.write_gallery(path, options.max_items, options.sort, options.ascending, options.duds, where))
    return EXIT_OK


def add_view_options(parser: argparse.ArgumentParser) -> None:
    """--max-items, and the quality view (sort by a signal, filter duds): shared with the sweep's command."""
    parser.add_argument("--max-items", type=int, default=500, help="cards shown (0 = all): the newest, or the first sorted")
    parser.add_argument("--sort", choices=SIGNALS, help="sort done items by this quality signal, largest first (docs/quality.md)")
    parser.add_argument("--ascending", action="store_true", help="with --sort: smallest first")
    parser.add_argument(
        "--duds", choices=("all", "only", "hide"), default="all", help="show every item, only the duds, or hide them"
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="SIGNAL<VALUE",
        help="only done items whose signal meets this (<, <=, >, >=; repeatable), e.g. --where 'motion<0.5'",
    )


def verify(args: list[str]) -> int:
    """check every finished file against its sidecar; --repair sets damaged items aside"""
    parser = argparse.ArgumentParser(prog="svdbatch verify", description="check every finished item of a run dir byte for byte")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument("--repair", action="store_true", help="set damaged items aside so the next run redoes them")
    options = parser.parse_args(args)
    try:
        report = api.verify(options.run_dir, repair=options.repair)
    except RunDirError as exc:
        print(f"svdbatch verify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(verify_json(report) if options.json else verify_text(report))
    return EXIT_ITEMS_FAILED if report.damaged or report.stale_exports else EXIT_OK


def score(args: list[str]) -> int:
    """quality signals of video files or folders (any maker), one JSON line per video"""
    parser = argparse.ArgumentParser(
        prog="svdbatch score",
        description="quality signals (docs/quality.md) of video files and folders, made by svdbatch or not: "
        "one JSON line per video on stdout; a file that is not a readable video gets a line with 'error' "
        "(and a note on stderr), and the rest go on",
        epilog="exit status: 0 every video scored, 1 some could not be read, 2 bad arguments or rules",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a video, a folder of videos, a run dir")
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a quality rule, as the quality group's keys (min_motion=0.5, max_black_frames=0, ...): "
        "each line then has 'dud' and 'verdict'",
    )
    options = parser.parse_args(args)
    rules: dict[str, object] = {}
    for rule in options.rule:
        key, sep, value = rule.partition("=")
        key = key.strip().removeprefix("quality.")
        try:
            rules[key] = json.loads(value) if sep else None
        except ValueError:
            rules[key] = value  # not a number: check_quality names it
        if not sep:
            print(f"svdbatch score: --rule {rule!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        results = api.score(options.paths, rules)
    except ConfigError as exc:
        print(f"svdbatch score: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    unreadable = 0
    for scored in results:
        if scored.error is not None:
            unreadable += 1
            print(f"svdbatch score: {scored.path}: {scored.error}", file=sys.stderr)
        print(json.dumps(scored.as_dict(bool(rules)), ensure_ascii=False), flush=True)
    return EXIT_ITEMS_FAILED if unreadable else EXIT_OK


def verify_json(report: api.VerifyReport) -> str:
    items = report.items
    return json.dumps(
        {
            "run_dir": str(report.run_dir),
            "checked": len(items),
            "ok": len(items) - len(report.damaged),
            "damaged": [{"id": r.item_id, "problems": r.problems} for r in report.damaged],
            "notes": [{"id": r.item_id, "notes": r.notes} for r in items if r.notes],
            "set_aside_in": str(report.set_aside_in) if report.set_aside_in else None,
            "busy": report.busy,
            "unrecorded_outputs": report.unrecorded_outputs,
            "stale_exports": report.stale_exports,
            "exports_rewritten": report.exports_rewritten,
        },
        ensure_ascii=False,
    )


def verify_text(report: api.VerifyReport) -> str:
    """One line per damaged item (its reasons), the notes, then the totals."""
    lines = []
    for item in report.items:
        if item.damaged:
            lines.append(f"DAMAGED {item.item_id}: " + "; ".join(item.problems))
        lines += [f"  note {item.item_id}: {note}" for note in item.notes]
    unrecorded, damaged = report.unrecorded_outputs, report.damaged
    if unrecorded:
        shown = ", ".join(unrecorded[:5]) + (" ..." if len(unrecorded) > 5 else "")
        lines.append(f"  note: {len(unrecorded)} file(s) in videos/ that no sidecar describes (other output settings?): {shown}")
    names = f" ({', '.join(r.item_id for r in damaged[:10])}{' ...' if len(damaged) > 10 else ''})" if damaged else ""
    checked = len(report.items)
    lines.append(f"svdbatch verify: {checked} items checked, {checked - len(damaged)} intact, {len(damaged)} damaged{names}")
    lines += [f"STALE {problem} (svdbatch verify --repair or the next run rewrites it)" for problem in report.stale_exports]
    if report.exports_rewritten:
        rewritten = "; ".join(report.exports_rewritten)
        lines.append(f"rewrote metadata.jsonl and the WebDataset shards, which were stale: {rewritten}")
    if report.set_aside_in:
        set_aside = len(damaged) - len(report.busy)
        lines.append(f"set aside {set_aside} item(s) in {report.set_aside_in}; run the same command again to redo them")
    if report.busy:
        lines.append(f"left alone (another process is generating them now): {', '.join(report.busy)}")
    return "\n".join(lines)


SUBCOMMANDS = {
    "validate": validate,
    "reproduce": reproduce,
    "status": status,
    "gallery": gallery,
    "verify": verify,
    "score": score,
}
