"""What happened to one planned item: the report a worker sends back for each item.

Its own module (no torch, no pipeline) so that the driver, which only plans and counts,
can read reports without importing what the workers compute with.
"""

from __future__ import annotations

from dataclasses import dataclass

DONE = "done"
FAILED = "failed"
BUSY = "busy"  # claimed by another process sharing the run dir
DONE_ELSEWHERE = "done_elsewhere"  # another process finished it after this run's plan
STOPPED = "stopped"  # not attempted: the run stopped (disk full)
INTERRUPTED = "interrupted"  # not attempted: a signal stopped the run (see stops.py)


@dataclass(frozen=True)
class Outcome:
    item_id: str
    status: str
    generate_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == DONE
