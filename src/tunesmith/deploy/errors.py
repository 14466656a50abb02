"""The deploy package's errors: an export that cannot be made or does not verify, a server that cannot start."""

from __future__ import annotations

from tunesmith.errors import TunesmithError


class ExportError(TunesmithError, RuntimeError):
    """The run cannot be exported in the asked format (GGUF, Modelfile, merged weights), or the
    export disagrees with the tuned model; the message says why and what works."""


class ServeError(TunesmithError, RuntimeError):
    """The server cannot start as asked (no key on a public address, nothing to serve, bad limits)."""
