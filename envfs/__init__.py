"""envfs: an encrypted folder with per-file data keys wrapped by a regional key service."""

__version__ = "0.1.0"
