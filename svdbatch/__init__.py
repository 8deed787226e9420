"""svdbatch: declarative, resumable, reproducible batch image-to-video with Stable Video Diffusion."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait for their siblings. On a CPU that other jobs
# share, a descheduled sibling leaves the others spinning: a tiny 64x64 item took ~30 s with
# 2 spinning threads and ~0.2 s with sleeping ones on a loaded 2-core machine
# (bench/threads.py). How threads wait never changes a result. OpenMP reads this when torch
# loads it, so it is set here, before any svdbatch module imports torch (worker processes
# inherit it); a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
