"""How much more data would buy: a saturating power law fitted to a measured learning curve.

``compare --data-sizes`` measures a method's test metric at several training-set sizes. Here the
points are fitted with a power law that approaches a ceiling,

    score(n) = c - a · n^(-b)        (a metric where higher is better; c + a · n^(-b) for loss),

the form used for learning curves since Cortes et al. 1994 ("Learning curves: asymptotic values
and rate of convergence") and in scaling-law work (Hestness et al. 2017, "Deep learning scaling is
predictable, empirically"). The fit is ``scipy.optimize.curve_fit`` weighted by each point's
interval. Its uncertainty is a parametric bootstrap: every point is redrawn within its own 95%
interval (normal, sd = width / 3.92), the curve refitted, and the 2.5th and 97.5th percentiles of
the predictions taken. With three points and three parameters the curve goes through the points,
so the interval comes from the points' own uncertainty alone; with fewer than three sizes nothing
is fitted.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

MIN_POINTS = 3  # three parameters (c, a, b)


def fit(points: list[dict[str, Any]], lower_is_better: bool = False, resamples: int = 400,
        seed: int = 0) -> dict[str, Any] | None:
    """Fit ``points`` (dicts with ``train_examples``, ``value``, ``low``, ``high``: one per size)
    and predict the score at twice the largest size.

    Returns None with fewer than ``MIN_POINTS`` distinct sizes or when the fit does not converge; else a dict: ``ceiling``, ``a``,
    ``b`` (the fitted parameters), ``n`` (the largest size), ``at_n`` and ``at_2n`` (fitted scores),
    ``gain`` (at_2n - at_n, in the metric's units: negative is better for a loss) with
    ``gain_low``/``gain_high`` and ``ceiling_low``/``ceiling_high`` (95% bootstrap intervals), and
    ``resamples_used`` (refits that converged). Raises ValueError for a size below 1.
    """
    pts = sorted((p for p in points if p.get("train_examples")), key=lambda p: p["train_examples"])
    if len({p["train_examples"] for p in pts}) < MIN_POINTS:
        return None
    n = np.array([p["train_examples"] for p in pts], dtype=float)
    if (n < 1).any():
        raise ValueError(f"training-set sizes must be >= 1, got {n.tolist()}")
    y = np.array([p["value"] for p in pts], dtype=float)
    sd = np.array([max((p["high"] - p["low"]) / 3.92, 1e-6) for p in pts], dtype=float)
    sign = -1.0 if lower_is_better else 1.0  # fit "higher is better" throughout
    best = _fit_one(n, sign * y, sd)
    if best is None:
        return None
    rng = np.random.default_rng(seed)
    gains, ceilings = [], []
    big = n.max()
    for _ in range(resamples):
        refit = _fit_one(n, sign * (y + rng.normal(0.0, sd)), sd)
        if refit is not None:
            gains.append(sign * (_curve(2 * big, *refit) - _curve(big, *refit)))
            ceilings.append(sign * refit[0])
    c, a, b = best
    at_n, at_2n = sign * _curve(big, c, a, b), sign * _curve(2 * big, c, a, b)
    low, high = (np.percentile(gains, [2.5, 97.5]) if gains else (math.nan, math.nan))
    c_low, c_high = (np.percentile(ceilings, [2.5, 97.5]) if ceilings else (math.nan, math.nan))
    return {"ceiling": sign * c, "a": a, "b": b, "n": int(big), "at_n": at_n, "at_2n": at_2n, "gain": at_2n - at_n,
            "gain_low": float(low), "gain_high": float(high), "ceiling_low": float(min(c_low, c_high)),
            "ceiling_high": float(max(c_low, c_high)), "resamples_used": len(gains), "lower_is_better": lower_is_better}


def curve(fitted: dict[str, Any], n: np.ndarray) -> np.ndarray:
    """The fitted score at sizes ``n`` (for plotting)."""
    sign = -1.0 if fitted["lower_is_better"] else 1.0
    return sign * _curve(np.asarray(n, dtype=float), sign * fitted["ceiling"], fitted["a"], fitted["b"])


def in_words(fitted: dict[str, Any] | None, metric: str, method: str) -> str:
    """One sentence: what doubling the data is expected to buy, with the fit's uncertainty."""
    if fitted is None:
        return (f"{method}: no learning-curve fit (it needs at least {MIN_POINTS} training-set sizes, i.e. "
                "compare --data-sizes with two or more sizes below all the data, and points a saturating curve fits)")
    lo, hi = sorted((fitted["gain_low"], fitted["gain_high"]))
    sure = "" if lo <= 0 <= hi else " (the interval excludes no change)"
    return (f"{method}: doubling the training data ({fitted['n']:,} -> {2 * fitted['n']:,} examples) is expected to "
            f"move test {metric} by {fitted['gain']:+.4f} (95% interval {lo:+.4f} to {hi:+.4f}){sure}; the fitted "
            f"ceiling is {fitted['ceiling']:.4f} [{fitted['ceiling_low']:.4f}, {fitted['ceiling_high']:.4f}] "
            "(a saturating power law through the measured sizes: an extrapolation, not a measurement)")


def _curve(n: np.ndarray | float, c: float, a: float, b: float) -> Any:
    return c - a * np.power(n, -b)


def _fit_one(n: np.ndarray, y: np.ndarray, sd: np.ndarray) -> tuple[float, float, float] | None:
    """c, a, b of ``c - a n^-b`` (a >= 0, 0 < b <= 3), or None when the fit does not converge."""
    from scipy.optimize import curve_fit

    span = float(y.max() - y.min()) or 1e-3
    start = (float(y.max()) + 0.1 * span, span * float(n.min()) ** 0.5, 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = curve_fit(_curve, n, y, p0=start, sigma=sd, absolute_sigma=True, maxfev=5000,
                                  bounds=([-np.inf, 0.0, 1e-3], [np.inf, np.inf, 3.0]))
    except (RuntimeError, ValueError):
        return None
    c, a, b = (float(x) for x in params)
    return (c, a, b) if all(map(math.isfinite, (c, a, b))) else None
