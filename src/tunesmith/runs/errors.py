"""The runs package's error (its own module, so every runs module can raise it)."""

from __future__ import annotations

from tunesmith.errors import TunesmithError


class RunError(TunesmithError, RuntimeError):
    """A run folder is missing, incomplete, or would be overwritten."""
