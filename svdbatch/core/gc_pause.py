"""Building a million small objects without the cyclic garbage collector.

While a restart builds its index and plan (millions of tuples, strings and dicts, no
cycles), each collection of the oldest generation walks everything built so far: about
half the time of loading the resume snapshot. Pausing the collector for such a phase
leaves nothing behind that it would have freed sooner than at the phase's end.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic collection inside; as it was afterwards (nested pauses are one)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
