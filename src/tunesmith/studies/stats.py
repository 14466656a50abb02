"""The statistics of a rating study, on plain lists (no files, no web): means with intervals, win rates,
the sign test, Bradley-Terry strengths, agreement (Krippendorff's alpha, Cohen's kappa), position bias.

Intervals are 95% percentile bootstrap intervals that resample *items* (prompts), not single
ratings: the ratings of one prompt are not independent (``tunesmith.evaluation.metrics.interval``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tunesmith.evaluation import metrics as M

RESAMPLES = 1000


def _by_item(items: Sequence[int]) -> tuple[list[int], dict[int, list[int]]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for row, item in enumerate(items):
        groups[item].append(row)
    keys = sorted(groups)
    return keys, groups


def clustered(stat: Callable[[list[int]], float], items: Sequence[int], resamples: int = RESAMPLES,
              seed: int = 0) -> tuple[float, float, float]:
    """``(value, low, high)`` of ``stat(rows)`` over all rows and its 95% interval when whole items
    are resampled with replacement (rows of one item stay together). NaN interval for no rows."""
    keys, groups = _by_item(items)
    rows_all = [r for k in keys for r in groups[k]]
    value = stat(rows_all) if rows_all else float("nan")

    def on(idx: np.ndarray) -> float:
        return stat([r for i in idx for r in groups[keys[i]]])

    low, high = M.interval(on, len(keys), resamples, seed)
    return value, low, high


def mean_interval(values: Sequence[float], items: Sequence[int], resamples: int = RESAMPLES) -> tuple[float, float, float]:
    """Mean of ``values`` (one per rating) with its item-clustered bootstrap interval."""
    arr = np.asarray(values, dtype=float)
    return clustered(lambda rows: float(arr[rows].mean()) if rows else float("nan"), items, resamples)


def win_rate(outcomes: Sequence[float], items: Sequence[int], resamples: int = RESAMPLES) -> dict[str, Any]:
    """Win rate of one system over another from ``outcomes`` (1 win, 0.5 tie, 0 loss, one per rating):
    rate with ties counted half and its item-clustered interval, and the two-sided sign test (exact
    binomial, ``scipy.stats.binomtest``) of "neither is preferred" over *prompts*: a prompt counts
    as won when its ratings' mean outcome is above 1/2, lost below, and is left out at exactly 1/2.
    Counting prompts, not ratings, keeps the test honest when several raters rate the same prompt
    (their ratings are not independent), as the interval does."""
    from scipy.stats import binomtest

    arr = np.asarray(outcomes, dtype=float)
    wins, losses = int((arr == 1).sum()), int((arr == 0).sum())
    rate, low, high = clustered(lambda rows: float(arr[rows].mean()) if rows else float("nan"), items, resamples)
    keys, groups = _by_item(items)
    means = [float(arr[groups[k]].mean()) for k in keys]
    won, lost = sum(m > 0.5 for m in means), sum(m < 0.5 for m in means)
    p = float(binomtest(won, won + lost).pvalue) if won + lost else 1.0
    return {"wins": wins, "losses": losses, "ties": int(len(arr) - wins - losses), "n": int(len(arr)),
            "prompts": len(keys), "prompts_won": won, "prompts_lost": lost,
            "rate": rate, "low": low, "high": high, "p_sign": p}


def bradley_terry(wins: dict[tuple[str, str], float], iterations: int = 10_000, tol: float = 1e-10) -> dict[str, float]:
    """Bradley-Terry strengths from ``wins[(i, j)]`` = how often i beat j (a tie counts half to each).

    P(i beats j) = p_i / (p_i + p_j). Fitted by the MM algorithm of Hunter (2004, "MM algorithms for
    generalized Bradley-Terry models", Ann. Statist. 32(1), eq. 3): p_i <- W_i / sum_j n_ij / (p_i + p_j),
    normalised to a geometric mean of 1. A system that never won gets strength 0 (the maximum-likelihood
    estimate lies on the boundary); one that never lost is capped by the iterations.
    """
    systems = sorted({s for pair in wins for s in pair})
    p = {s: 1.0 for s in systems}
    total_wins = {s: sum(w for (i, _), w in wins.items() if i == s) for s in systems}
    games = defaultdict(float)
    for (i, j), w in wins.items():
        games[frozenset((i, j))] += w
    for _ in range(iterations):
        new = {}
        for i in systems:
            denom = sum(n / (p[i] + p[j]) for pair, n in games.items() if i in pair
                        for j in pair - {i} if p[i] + p[j] > 0)
            new[i] = total_wins[i] / denom if denom else 0.0
        positive = [v for v in new.values() if v > 0]
        g = math.exp(sum(math.log(v) for v in positive) / len(positive)) if positive else 1.0
        new = {s: v / g for s, v in new.items()}
        change = max(abs(new[s] - p[s]) for s in systems) if systems else 0.0
        p = new
        if change < tol:
            break
    return p


def krippendorff_alpha(table: Sequence[Sequence[float]], level: str = "ordinal") -> float | None:
    """Krippendorff's alpha (``krippendorff.alpha``) of a raters x units table (NaN = not rated);
    None when fewer than two raters rated a common unit or every value is the same."""
    import krippendorff

    data = np.asarray(table, dtype=float)
    if data.ndim != 2 or data.shape[0] < 2 or not (np.sum(~np.isnan(data), axis=0) >= 2).any():
        return None
    values = data[~np.isnan(data)]
    if len(np.unique(values)) < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):  # the package divides by zero on degenerate tables
        value = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    return None if math.isnan(value) else value


def shared_units(table: Sequence[Sequence[float]]) -> int:
    """How many units (columns) at least two raters rated: what an alpha is computed from."""
    data = np.asarray(table, dtype=float)
    return int((np.sum(~np.isnan(data), axis=0) >= 2).sum()) if data.ndim == 2 and data.size else 0


def cohen_kappa(a: Sequence[str], b: Sequence[str], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Cohen's kappa of two label sequences (``sklearn.metrics.cohen_kappa_score``), raw agreement,
    and a bootstrap interval of kappa over the labelled units. NaN kappa when undefined."""
    from sklearn.metrics import cohen_kappa_score

    a, b = list(a), list(b)
    n = len(a)
    if n == 0:
        return {"kappa": float("nan"), "low": float("nan"), "high": float("nan"), "agreement": float("nan"), "n": 0}

    def kappa(idx: Sequence[int]) -> float:
        x, y = [a[i] for i in idx], [b[i] for i in idx]
        if len(set(x) | set(y)) < 2:
            return 1.0 if x == y else 0.0  # one label everywhere: kappa is undefined; agreement decides
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(cohen_kappa_score(x, y))

    low, high = M.interval(lambda idx: kappa(list(idx)), n, resamples, seed)
    return {"kappa": kappa(range(n)), "low": low, "high": high,
            "agreement": sum(x == y for x, y in zip(a, b)) / n, "n": n}


def majority(labels: Sequence[str]) -> str | None:
    """The most frequent label (which may be "tie": the raters said the answers are equal); None when
    there is no majority: no labels, or the top two equally frequent (a split vote)."""
    counts = Counter(labels).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def position_bias(left_won: Sequence[bool]) -> dict[str, Any]:
    """How often the left answer won among decisive preferences, and the exact binomial test of 1/2."""
    from scipy.stats import binomtest

    n, k = len(left_won), int(sum(left_won))
    return {"left_wins": k, "decisive": n, "rate": k / n if n else float("nan"),
            "p": float(binomtest(k, n).pvalue) if n else 1.0}


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Spearman's rank correlation (``scipy.stats.spearmanr``) and its p-value; NaN when undefined."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": float("nan"), "p": float("nan"), "n": len(x)}
    r = spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(x)}
