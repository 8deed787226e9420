"""svdbatch: declarative, resumable, reproducible batch image-to-video with Stable Video Diffusion."""

__version__ = "0.1.0"
