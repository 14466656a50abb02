"""The deploy package's error: an export that cannot be made or does not verify."""


class ExportError(RuntimeError):
    """The run cannot be exported in the asked format, or the export disagrees with the tuned
    model; the message says why and what works."""


class ServeError(RuntimeError):
    """The server cannot start as asked (no key on a public address, nothing to serve, bad limits)."""
