"""Exit codes and the errors that are the input's fault: the one place both are defined.

Every command (a run, `validate`, `status`, `verify`, ...) maps its outcome to these codes;
an error of USER_ERRORS is reported as one clear message and exit 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1  # some items failed (failures.jsonl); `reproduce`: the frames differ
EXIT_BAD_INPUT = 2  # bad config, manifest, run dir or command line: nothing generated
EXIT_STOPPED = 3  # disk full, run dir read-only or deleted mid-run: finished items are intact, run again to resume
# Stopped by a signal (clean stop, run again to resume): 128 + the signal's number, as a
# shell reports a process killed by it: SIGINT 130, SIGUSR2 140, SIGTERM 143.
EXIT_SIGNAL_BASE = 128


def exit_code_for_signal(signum: int) -> int:
    return EXIT_SIGNAL_BASE + int(signum)


class ConfigError(ValueError):
    """A config value that is well-typed but not usable (out of range, inconsistent)."""


# How many problems a message lists before '... and N more': a 1M-row manifest with 10k
# bad rows must not print 10k lines (`svdbatch validate --all` lists them all).
SHOWN_PROBLEMS = 10
MORE_PROBLEMS_HINT = "`svdbatch validate ... --all` lists every one; run.strict=false records them in failures.jsonl"


def problems_summary(problems: Sequence[object], shown: int | None = SHOWN_PROBLEMS, rest: str = "") -> list[str]:
    """The first `shown` problems (None: all), one indented line each, then '... and N more'
    (`rest` says where they all are)."""
    lines = [f"  {p}" for p in (problems if shown is None else problems[:shown])]
    if shown is not None and len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown:,} more{f' ({rest})' if rest else ''}")
    return lines


class ManifestError(Exception):
    """Rows of a manifest that cannot be used; `problems` name the file, row and field (all
    of them; the message shows the first SHOWN_PROBLEMS and counts the rest)."""

    def __init__(self, problems: Sequence[object]):
        self.problems = list(problems)
        lines = [f"{len(self.problems):,} problem(s) in the manifest:", *problems_summary(self.problems, rest=MORE_PROBLEMS_HINT)]
        super().__init__("\n".join(lines))


class RunDirError(RuntimeError):
    """The run dir cannot be used (not a folder of its own, not writable, no room)."""


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded (missing weights, a bad source or device)."""


class CannotReproduce(RuntimeError):
    """An item that cannot be re-run as its sidecar records it (`svdbatch reproduce`)."""


# Errors that are the input's fault: a clear message and exit 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ManifestError, ConfigError, ModelLoadError, RunDirError)
