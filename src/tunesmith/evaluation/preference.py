"""Did preference tuning work? Held-out pairs scored by the starting model and the tuned one.

For each test pair, each model's summed log-probability of the chosen and the rejected answer (``pair_logps``). From
them, for base and tuned alike:

* ``pairwise_accuracy``: share of pairs whose chosen answer the model finds more likely than the rejected one (sums
  of log-probs; a tie counts 1/2), and ``pairwise_accuracy_per_token`` (mean log-prob per token: longer answers are
  not penalised);
* ``logps_chosen``, ``logps_rejected``: mean summed log-probs (both falling is the known failure of DPO: the chosen
  answer must not become less likely for the margin to grow);

and for the tuned model against the base (its reference), DPO's implicit reward ``beta * (logp_tuned - logp_base)``
(Rafailov et al. 2023, section 5) without its ``beta`` (so objectives trained with different betas compare):
``reward_accuracy`` (share of pairs where tuning raised chosen over rejected) and ``margin_gain`` (nats: the mean of
how much tuning raised chosen's log-prob minus how much it raised rejected's). Every value carries a 95% percentile-bootstrap
interval (``eval.bootstrap_resamples``); the base-vs-tuned change of ``pairwise_accuracy`` an exact McNemar test on
the pairs whose verdict changed (scipy's binomial test) and a paired bootstrap p-value.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from tunesmith import runtime
from tunesmith.data.pairs import Pair
from tunesmith.evaluation import metrics as M


@torch.no_grad()
def pair_logps(model: torch.nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, bf16: bool,
               advance: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per pair: ``chosen``, ``rejected`` (summed log-probs of the answers' target tokens) and ``n_chosen``,
    ``n_rejected`` (their counts), each (P,). Paired rows only."""
    from tunesmith.training.preference import row_logps

    model.eval()
    dev = next(model.parameters()).device
    out: dict[str, list[float]] = {"chosen": [], "rejected": [], "n_chosen": [], "n_rejected": []}
    for i in range(0, len(pairs), batch_size):
        part = [p for p in pairs[i : i + batch_size] if p.rejected is not None]
        rows = [p.sides()[0] for p in part] + [p.rejected for p in part]
        with runtime.autocast(dev, bf16):
            logp, count = row_logps(model, rows, pad_id)
        k = len(part)
        out["chosen"] += logp[:k].tolist()
        out["rejected"] += logp[k:].tolist()
        out["n_chosen"] += count[:k].tolist()
        out["n_rejected"] += count[k:].tolist()
        if advance:
            advance(len(part))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a > b) + 0.5 * (a == b)


def side_metrics(s: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, M.Stat]]:
    """One model's metrics of the pairs and their resamplable statistics."""
    per = {"pairwise_accuracy": _wins(s["chosen"], s["rejected"]),
           "pairwise_accuracy_per_token": _wins(s["chosen"] / np.maximum(s["n_chosen"], 1),
                                                s["rejected"] / np.maximum(s["n_rejected"], 1)),
           "logps_chosen": s["chosen"], "logps_rejected": s["rejected"]}
    return ({k: float(v.mean()) for k, v in per.items()},
            {k: (lambda idx, v=v: float(v[idx].mean())) for k, v in per.items()})


def compare_sides(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], resamples: int,
                  seed: int = 0) -> dict[str, Any]:
    """eval.json's ``base``, ``tuned`` and ``tuned_vs_base`` blocks (values with ``ci``), and ``mcnemar``."""
    from scipy.stats import binomtest

    n = len(base["chosen"])
    out: dict[str, Any] = {}
    stats = {}
    for name, s in (("base", base), ("tuned", tuned)):
        values, stats[name] = side_metrics(s)
        ci = {k: list(M.interval(st, n, resamples, seed)) for k, st in stats[name].items()}
        out[name] = values | {"ci": ci}
    rc, rr = tuned["chosen"] - base["chosen"], tuned["rejected"] - base["rejected"]
    rewards = {"reward_accuracy": _wins(rc, rr), "margin_gain": rc - rr}
    for k, v in rewards.items():
        out["tuned"][k] = float(v.mean())
        out["tuned"]["ci"][k] = list(M.interval(lambda idx, v=v: float(v[idx].mean()), n, resamples, seed))
    out["tuned_vs_base"] = {k: {"p_value": M.paired_p_value(stats["tuned"][k], stats["base"][k], n, resamples, seed),
                                "p_floor": 1 / (1 + resamples)}
                            for k in ("pairwise_accuracy", "pairwise_accuracy_per_token")}
    b, t = base["chosen"] > base["rejected"], tuned["chosen"] > tuned["rejected"]
    gained, lost = int(np.sum(t & ~b)), int(np.sum(b & ~t))
    out["mcnemar"] = {"gained": gained, "lost": lost,
                      "p_value": float(binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0}
    return out


def length_block(base: list[int], tuned: list[int], resamples: int, seed: int = 0) -> dict[str, Any]:
    """Answer length in tokens, base vs tuned, on the same prompts: means, intervals, and the change's interval
    (preference tuning is known to lengthen answers)."""
    b, t = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    n = len(b)
    mean = lambda v: (lambda idx: float(v[idx].mean()))  # noqa: E731
    return {"prompts": n, "base": float(b.mean()) if n else None, "tuned": float(t.mean()) if n else None,
            "base_ci": list(M.interval(mean(b), n, resamples, seed)), "tuned_ci": list(M.interval(mean(t), n, resamples, seed)),
            "change_ci": list(M.interval(mean(t - b), n, resamples, seed)),
            "p_value": M.paired_p_value(mean(t), mean(b), n, resamples, seed) if n else None}


@torch.no_grad()
def single_logps(model: torch.nn.Module, rows: list[Pair], pad_id: int, batch_size: int, bf16: bool) -> np.ndarray:
    """Per unpaired row (one answer each): the summed log-probability of its answer's target tokens (R,)."""
    from tunesmith.training.preference import row_logps

    model.eval()
    dev = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        with runtime.autocast(dev, bf16):
            out += row_logps(model, [p.sides()[0] for p in rows[i : i + batch_size]], pad_id)[0].tolist()
    return np.asarray(out, dtype=np.float64)


def unpaired_block(base: np.ndarray, tuned: np.ndarray, desirable: np.ndarray, resamples: int,
                   seed: int = 0) -> dict[str, Any]:
    """Single answers marked good or bad (KTO's data): each model's mean log-prob of the good and the bad answers, and
    how tuning moved them, ``change = logp_tuned - logp_base`` (nats): ``reward_auc``, the chance that a good answer's
    change exceeds a bad one's (the area under the ROC curve of the change as a good-vs-bad score; 0.5 = no
    separation), and ``reward_gap``, the mean change of the good answers minus that of the bad ones; with 95%
    bootstrap intervals (rows resampled within each label)."""
    from sklearn.metrics import roc_auc_score

    good, bad = np.flatnonzero(desirable), np.flatnonzero(~desirable)
    change = tuned - base
    rng = np.random.default_rng(seed)

    def stats(g: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        values = np.concatenate([change[g], change[b]])
        labels = np.concatenate([np.ones(len(g)), np.zeros(len(b))])
        auc = float(roc_auc_score(labels, values)) if len(g) and len(b) else float("nan")
        return auc, float(change[g].mean() - change[b].mean()) if len(g) and len(b) else float("nan")

    auc, gap = stats(good, bad)
    draws = [stats(rng.choice(good, len(good)), rng.choice(bad, len(bad))) for _ in range(resamples if len(good) and len(bad) else 0)]
    ci = (lambda k: [float(np.percentile([d[k] for d in draws], 2.5)), float(np.percentile([d[k] for d in draws], 97.5))]
          if draws else [float("nan")] * 2)
    side = lambda v: {"logps_desirable": float(v[good].mean()) if len(good) else None,  # noqa: E731
                      "logps_undesirable": float(v[bad].mean()) if len(bad) else None}
    return {"desirable": int(len(good)), "undesirable": int(len(bad)), "base": side(base), "tuned": side(tuned),
            "reward_auc": auc, "reward_auc_ci": ci(0), "reward_gap": gap, "reward_gap_ci": ci(1)}
