"""The one base of every error tunesmith raises for the user to read.

Each package keeps its own error class (``ConfigError``, ``DataError``, ``ModelError``,
``RunError``, ``ExportError``, ...), and every one derives from ``TunesmithError``, whose message
is what the user must read: what is wrong, where (file, line, field), and what to do. The command
line catches this one class and prints ``error: <message>`` with exit status 2, never a traceback;
anything else that escapes is a bug in tunesmith.

The classes also keep the built-in base they had (``ValueError`` for bad input, ``RuntimeError``
for a failed operation), so code that caught those still does.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """An error whose message is written for the user (no traceback needed to understand it)."""
