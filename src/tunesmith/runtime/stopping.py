"""Stopping long work cleanly on SIGTERM or Ctrl-C, so it can be continued.

Training and evaluation both run under ``StopRequests``: the first SIGINT (Ctrl-C) or SIGTERM (a
scheduler's, torchrun's or a service manager's stop) only records the request; the work checks
``requested`` at its next safe point (the end of a step, a batch of answers), saves what it has
and stops; the command then exits with ``EXIT_RESUMABLE`` (75). A second Ctrl-C interrupts at once
(KeyboardInterrupt; exit 130).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

EXIT_RESUMABLE = 75  # stopped by SIGTERM/SIGINT with its work saved: run the same command (or --resume) again


class Stopped(RuntimeError):
    """Long work stopped at a safe point on request (SIGTERM/Ctrl-C), its progress saved; the message
    says what was kept and how to continue."""


class StopRequests:
    """SIGINT and SIGTERM while inside: the first is recorded (``signal`` names it, ``requested``
    is True); a second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only in the
    main thread (elsewhere nothing is caught) and the previous ones are restored on exit."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class EvaluationStopped(Stopped):
    """The evaluation stopped on request; every answer made so far is kept in the run's eval_cache/."""
