"""The data package's error type (its own module, so every data module can raise it)."""

from __future__ import annotations

from tunesmith.errors import TunesmithError


class DataError(TunesmithError, ValueError):
    """Bad input data; the message names file, line and field."""
