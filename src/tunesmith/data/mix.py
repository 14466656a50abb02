"""Multi-task mixing: one training list drawn from several tasks' rows, each task at its share.

Shares come from ``mixing.by``: ``weight`` (proportional to ``tasks[].weight``), ``temperature``
(to size^(1/T): T = 1 is the data as it is, a large T near uniform) or ``size`` (the data as it is).
The mixed list has as many rows as all tasks together; each task's count is its share of that,
rounded by largest remainder, filled with whole copies of the task's rows plus a seeded sample of
the rest (so a task smaller than its share is repeated, a larger one subsampled). The training
loop shuffles the list each epoch, so the order here does not matter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, TypeVar

Row = TypeVar("Row")


def target_shares(sizes: dict[str, int], weights: dict[str, float], by: str, temperature: float) -> dict[str, float]:
    """The share (summing to 1) each task should have of the mix. Raises ValueError for an unknown ``by``."""
    if by == "weight":
        raw = {n: weights[n] for n in sizes}
    elif by == "size":
        raw = {n: float(s) for n, s in sizes.items()}
    elif by == "temperature":
        raw = {n: float(s) ** (1.0 / temperature) for n, s in sizes.items()}
    else:
        raise ValueError(f"mixing.by: {by!r} is not one of weight, temperature, size")
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}


def counts_for(shares: dict[str, float], total: int) -> dict[str, int]:
    """Whole row counts summing to ``total`` closest to ``shares`` (largest remainder); each task
    gets at least one row."""
    exact = {n: s * total for n, s in shares.items()}
    counts = {n: max(1, math.floor(v)) for n, v in exact.items()}
    by_remainder = sorted(exact, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True)
    for n in by_remainder[: max(0, total - sum(counts.values()))]:
        counts[n] += 1
    return counts


def mix(rows: dict[str, Sequence[Row]], weights: dict[str, float], by: str = "weight", temperature: float = 2.0,
        seed: int = 0, total: int | None = None) -> tuple[list[Row], dict[str, Any]]:
    """The mixed training list and a report of what was drawn.

    ``rows``: task name -> its encoded rows; ``total``: rows in the mix (default: all rows of all
    tasks). Deterministic in ``seed``. The report has, per task, its rows, target share, rows drawn,
    achieved share and how often its rows repeat (``repeats`` > 1: upsampled; < 1: subsampled).
    Raises ValueError when a task has no rows.
    """
    empty = [n for n, r in rows.items() if not r]
    if empty:
        raise ValueError(f"tasks with no training rows: {', '.join(empty)}")
    sizes = {n: len(r) for n, r in rows.items()}
    total = total or sum(sizes.values())
    shares = target_shares(sizes, weights, by, temperature)
    counts = counts_for(shares, total)
    rng = random.Random(seed)
    out: list[Row] = []
    for name in rows:  # in config order: the same seed draws the same rows
        data, n = rows[name], counts[name]
        whole, rest = divmod(n, len(data))
        out += list(data) * whole + [data[i] for i in sorted(rng.sample(range(len(data)), rest))]
    drawn = sum(counts.values())
    report = {"by": by, "rows": drawn, "tasks": {
        n: {"rows": sizes[n], "target_share": shares[n], "drawn": counts[n], "share": counts[n] / drawn,
            "repeats": counts[n] / sizes[n]} for n in rows}}
    if by == "temperature":
        report["temperature"] = temperature
    return out, report
