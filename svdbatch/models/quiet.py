"""Library chatter that would drown the item bar: silenced once per process that loads a pipeline."""

from __future__ import annotations

import warnings


def quiet_libraries() -> None:
    """diffusers/transformers progress bars and advisory warnings would drown the item bar."""
    import diffusers
    import transformers

    # Newer diffusers renamed from_pretrained's torch_dtype to dtype; the old name works in
    # every version we support, so its deprecation notice is noise.
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
