"""memory.compile's backend and mode, checked against torch's own lists before any worker loads."""

from __future__ import annotations

from svdbatch.core.config import MemoryConfig


def compile_problems(memory: MemoryConfig) -> list[str]:
    """memory.compile_mode / compile_backend as torch knows them, checked before the model
    loads (torch.compile would fail in every worker). Imports torch._dynamo: only when compiling."""
    if not memory.compile:
        return []
    import torch._dynamo  # torch only when compiling: the driver checks this before any worker loads
    import torch._inductor

    problems = []
    backends = torch._dynamo.list_backends(exclude_tags=())
    if memory.compile_backend not in backends:
        problems.append(f"memory.compile_backend: must be one of {', '.join(backends)}, got {memory.compile_backend!r}")
    modes = list(torch._inductor.list_mode_options())
    if memory.compile_backend == "inductor" and memory.compile_mode not in modes:
        problems.append(f"memory.compile_mode: must be one of {', '.join(modes)}, got {memory.compile_mode!r}")
    return problems
