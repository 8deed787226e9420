"""Stopping a run on a signal, and worker processes that never outlive their driver.

SIGINT (Ctrl-C), SIGTERM (Slurm, Kubernetes, systemd) and SIGUSR2 (Slurm's `--signal`,
submitit's preemption / time-limit warning) all ask the driver to stop:

* first signal: hand out no new work; the items in flight finish and commit, for up to
  `run.stop_grace_s` seconds; then the run stops and says how many items are left.
* a second signal, or the grace running out: the items still in flight are abandoned. The
  sidecar rename is what commits an item, so an abandoned item is simply not done; its
  temporaries are removed and the next run redoes it.

Before any item is in flight (validating, planning) there is nothing to protect and a
signal stops the run at once. Worker processes ignore these signals (a terminal sends
Ctrl-C to the whole process group, Slurm signals every process of the step): the driver
coordinates and kills them after the grace. They also die with the driver however it
ends, SIGKILL included: PR_SET_PDEATHSIG on Linux, and a thread that watches the parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
# How often a worker checks that its driver is still there (where PDEATHSIG is missing).
PARENT_POLL_S = 1.0
_PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """Raised in the driver's main thread to stop now. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` records it as an item failure."""


class StopRequest:
    """What the signal handler saw. The handler only sets fields (or raises Interrupted
    while nothing is in flight); the code that runs the items polls `requested` and
    `abandon()`, so an item is never cut between its writes."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.deadline: float | None = None
        self.now = False
        # True while items may be in flight: the handler must not raise then.
        self.cooperative = False
        # Handlers that were installed before ours (submitit's preemption handler).
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def is_requested(self) -> bool:  # a plain callable, for the workers
        return self.signum is not None

    def abandon(self) -> bool:
        """Give up the items in flight: a second signal, or the grace is over."""
        return self.now or (self.deadline is not None and time.monotonic() >= self.deadline)

    def handle(self, signum: int, frame: Any = None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            self.deadline = time.monotonic() + self.grace_s
            if not self.cooperative:
                raise Interrupted(signum)
            log.warning(
                "%s: finishing the items in flight (up to run.stop_grace_s=%g s), then stopping; send it again to stop now",
                name,
                self.grace_s,
            )
        elif not self.now:
            self.now = True
            log.warning("%s again: abandoning the items in flight", name)
            if not self.cooperative:
                raise Interrupted(signum)

    @contextmanager
    def nothing_in_flight(self) -> Iterator[None]:
        """A phase with no item in flight inside the cooperative part (loading the model in
        this process): a signal stops it at once instead of waiting for it to end."""
        if self.requested:
            raise Interrupted(self.signum)
        cooperative, self.cooperative = self.cooperative, False
        try:
            yield
        finally:
            self.cooperative = cooperative

    def pass_on(self) -> None:
        """Call the handler that was there before ours for the signal that stopped the run,
        once the run has stopped cleanly. Under submitit that is its SIGUSR2 handler, which
        checkpoints the job, requeues it and exits (SystemExit): the requeued job resumes
        the run. Python's own SIGINT handler (KeyboardInterrupt) is not called."""
        handler = self.previous.get(self.signum) if self.signum is not None else None
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)


@contextmanager
def stop_on_signals(grace_s: float) -> Iterator[StopRequest]:
    """Install the stop handler for STOP_SIGNALS while the run lasts (main thread only:
    elsewhere, e.g. a run started from a thread, signals keep their usual effect)."""
    request = StopRequest(grace_s)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    # A signal ignored when we started stays ignored: a shell starts background jobs of a
    # script with SIGINT ignored so that Ctrl-C reaches only the foreground job (nohup: SIGHUP).
    request.previous = {
        sig: signal.signal(sig, request.handle) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield request
    finally:
        for sig, handler in request.previous.items():
            signal.signal(sig, handler)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block STOP_SIGNALS while worker processes start: a child inherits the blocked mask
    through fork and exec, so it cannot be killed by a Ctrl-C while it is still importing
    (before `ignore_stop_signals` runs). Signals that arrive meanwhile reach the driver
    when the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals() -> None:
    """In a worker process: the driver decides when to stop."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(parent_pid: int, exit_now: Callable[[int], None] = os._exit) -> None:
    """In a worker process: end when the driver ends, even by SIGKILL (a worker waiting for
    work would otherwise idle forever, holding its memory and its device)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watch thread below still covers it
    if os.getppid() != parent_pid:  # the driver died before PDEATHSIG was set
        exit_now(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        exit_now(1)

    threading.Thread(target=watch, name="svdbatch-parent-watch", daemon=True).start()
