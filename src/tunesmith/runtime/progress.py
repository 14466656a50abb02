"""Progress of long work, visible wherever the output goes.

On a terminal: rich's live bars (ETA, rate, the caller's fields such as loss and tokens/s). When
the output is a file or a pipe (nohup, CI, a service, a dashboard's child process), rich draws
nothing until the end, so ``make_progress`` returns the same ``rich.progress.Progress`` with its
live display off and plain lines instead: one when a task starts, then at most one every
``LINE_SECONDS`` seconds, and one when it completes::

    evaluating tuned: 120/872 (14%), 3.2/s, ETA 3m55s

Rates are averages since the task started (work that arrives in bursts, a batch of answers at
once, made rich's recent-window speed say 9/s for a task doing one every 20 s); a caller that
restores finished work (a resumed evaluation) resets the task so the rate covers new work only.
``on_update`` (optional) is told of every change (description, completed, total, rate per
second, ETA in seconds or None), at most every ``PHASE_SECONDS``: ``runs.phase`` writes it to the
run folder for the dashboard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

LINE_SECONDS = 30.0  # plain lines: at most one per task this often (plus its start and its end)
PHASE_SECONDS = 2.0  # on_update: at most this often per task (plus its start and its end)

OnUpdate = Callable[[str, float, float | None, float | None, float | None], None]


def columns(extra: str | None = "{task.fields[info]}") -> list[ProgressColumn]:
    """The bar's columns: description, bar, done/total, the caller's ``extra`` text, elapsed, ETA."""
    cols: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if extra:
        cols.append(TextColumn(extra))
    return cols + [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]


class LoggedProgress(Progress):
    """A ``rich.progress.Progress`` that also writes plain progress lines when its console is not
    a terminal (its live display then stays off), and calls ``on_update`` as tasks move.
    Task fields named ``info`` (or any text field) are added to the lines."""

    def __init__(self, *cols: ProgressColumn, console: Console | None = None, disable: bool = False,
                 on_update: OnUpdate | None = None, line_seconds: float = LINE_SECONDS) -> None:
        console = console or Console(soft_wrap=True)  # a log line is one line, whatever its length
        self.plain = not disable and not console.is_terminal
        super().__init__(*(cols or columns()), console=console, disable=disable or self.plain)
        self.on_update = on_update
        self.line_seconds = line_seconds
        self._said: dict[TaskID, float] = {}
        self._told: dict[TaskID, float] = {}

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task = super().add_task(description, start, total, completed, visible, **fields)
        self._report(task, force=True)
        return task

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID, force: bool = False) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return
            done = task.total is not None and task.completed >= task.total
            now = time.monotonic()
            rate, eta = _average(task.completed, task.total, task.elapsed)
            if self.on_update is not None and (force or done or now - self._told.get(task_id, 0.0) >= PHASE_SECONDS):
                self._told[task_id] = now
                self.on_update(task.description, task.completed, task.total, rate, eta)
            if not self.plain or not (force or now - self._said.get(task_id, 0.0) >= self.line_seconds
                                      or (done and self._said.get(task_id) != -1.0)):
                return
            self._said[task_id] = -1.0 if done else now
            line = describe(task.description, task.completed, task.total, rate, eta, task.fields)
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)


def _average(completed: float, total: float | None, elapsed: float | None) -> tuple[float | None, float | None]:
    """Rate since the task started and the ETA it gives: work that arrives in bursts (a batch of
    answers at once) would make rich's recent-window speed say 9/s for a task doing 1 every 20 s."""
    if not elapsed or elapsed <= 0 or not completed:
        return None, None
    rate = completed / elapsed
    return rate, ((total - completed) / rate if total is not None else None)


def describe(description: str, completed: float, total: float | None, rate: float | None, eta: float | None,
             fields: dict[str, Any] | None = None) -> str:
    """'evaluating tuned: 120/872 (14%), 3.2/s, ETA 3m55s, loss 0.41' (the parts that are known)."""
    parts = [f"{completed:,.0f}/{total:,.0f} ({completed / total:.0%})" if total else f"{completed:,.0f}"]
    if rate:
        parts.append(f"{rate:,.2f}/s" if rate < 10 else f"{rate:,.0f}/s")
    if eta is not None and total and completed < total:
        parts.append(f"ETA {hms(eta)}")
    parts += [str(v) for v in (fields or {}).values() if isinstance(v, str) and v]
    return f"{description}: " + ", ".join(parts)


def hms(seconds: float) -> str:
    """3725 -> '1h02m05s', 235 -> '3m55s', 9 -> '9s'."""
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def make_progress(console: Console | None = None, extra: str | None = "{task.fields[info]}", disable: bool = False,
                  on_update: OnUpdate | None = None) -> LoggedProgress:
    """The progress display every long phase uses (see the module docstring). Tasks must give an
    ``info`` field when ``extra`` refers to it (an empty string is fine)."""
    return LoggedProgress(*columns(extra), console=console, disable=disable, on_update=on_update)
