"""Every metric, computed in one place, with bootstrap confidence intervals and paired tests.

Classification: accuracy, macro and per-class precision/recall/F1, confusion matrix
(scikit-learn). Generation: ROUGE-1/2/L (``rouge-score``), BLEU and chrF (``sacrebleu``),
exact match, each against one or several references per example. Loss and perplexity from each
example's negative log-likelihood (``language_model``).

Uncertainty: a metric is a function of which test examples it is computed on, so resampling
the examples with replacement (the bootstrap) gives its spread. ``interval`` is the 95%
percentile interval over ``resamples`` resamples; ``paired_p_value`` compares two systems on
the *same* resamples (paired: both saw the same examples), two-sided, testing whether the
observed difference could be resampling noise around zero (Efron & Tibshirani 1993, 16.4;
as used for MT by Koehn 2004).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Stat = Callable[[np.ndarray], float]  # metric of the examples at these indices
RESAMPLES = 1000


# ---------------------------------------------------------------- classification


def classification(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro P/R/F1, per-class P/R/F1/support and the confusion matrix (rows = true).

    The macro averages run over the labels that occur among the references or the predictions
    (scikit-learn's default set), not every declared label: a class the test set does not hold
    and no answer names has no precision or recall to average, and counting it as 0 understated
    macro F1 (TREC's first 96 test questions hold no abbreviation: 0.350 instead of 0.42). Such
    classes stay in ``per_class`` with support 0."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    seen = set(y_true) | set(y_pred)
    present = [lab for lab in labels if lab in seen] or labels
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    pc, rc, fc, sc = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(p), "recall": float(r), "f1": float(f1),
        "per_class": {lab: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
                      for lab, a, b, c, d in zip(labels, pc, rc, fc, sc)},
        "confusion": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    }


def classification_stats(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Stat]:
    """Resamplable accuracy and macro F1 (by counting, so 1,000 resamples take milliseconds); macro F1
    over the classes present in the sample, as ``classification`` computes it."""
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    t = np.array([index.get(y, k) for y in y_true])  # k: a label outside the list (never predicted right)
    p = np.array([index.get(y, k) for y in y_pred])
    correct = (t == p).astype(float)

    def macro_f1(idx: np.ndarray) -> float:
        ti, pi = t[idx], p[idx]
        hit = ti == pi
        tp = np.bincount(ti[hit], minlength=k + 1)[:k]
        pred = np.bincount(pi, minlength=k + 1)[:k]
        true = np.bincount(ti, minlength=k + 1)[:k]
        denom = pred + true  # classes absent from this sample's references and predictions are left out
        return float(np.mean(2 * tp[denom > 0] / denom[denom > 0])) if (denom > 0).any() else 0.0

    return {"accuracy": lambda idx: float(correct[idx].mean()), "f1": macro_f1}


# ---------------------------------------------------------------- generation

References = Sequence[str] | Sequence[Sequence[str]]  # one gold answer per example, or several


def _multi(references: References) -> list[list[str]]:
    """Every example's references as a list (the first is the training target)."""
    return [[r] if isinstance(r, str) else [x for x in r if x] or [""] for r in references]


def normalize(text: str) -> str:
    """Lower case, collapsed whitespace, no surrounding punctuation: for exact match."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?,;:\"'")


def exact_match(references: References, predictions: Sequence[str]) -> list[float]:
    """1.0 where the prediction equals one of the example's references (normalised), else 0.0."""
    return [float(any(normalize(r) == normalize(p) for r in refs)) for refs, p in zip(_multi(references), predictions)]


def rouge(references: References, predictions: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measures (``rouge-score``, Porter stemming); with several references,
    the best-matching one per example and metric (``RougeScorer.score_multi``, as rouge-score defines it)."""
    from rouge_score import rouge_scorer  # pulls in nltk: imported only when generation is scored

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(refs, p) for refs, p in zip(_multi(references), predictions)]
    return {k: [s[k].fmeasure for s in scores] for k in ("rouge1", "rouge2", "rougeL")}


def _streams(references: References) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, None where an example has fewer."""
    multi = _multi(references)
    k = max((len(r) for r in multi), default=1)
    return [[r[j] if j < len(r) else None for r in multi] for j in range(k)]


SCALES = {"bleu": "0-100", "chrf": "0-100",  # sacrebleu's scale; every other score here is 0-1 but:
          "logps_chosen": "summed log-prob", "logps_rejected": "summed log-prob", "margin_gain": "nats",
          "reward_gap": "nats"}


def metric_label(key: str) -> str:
    """A metric's name as tables show it, with its scale where it is not 0-1 (``chrf (0-100)``)."""
    return f"{key} ({SCALES[key]})" if key in SCALES else key


def bleu(references: References, predictions: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100; with several
    references, n-gram matches are clipped by the most in any reference and the closest reference
    length counts (Papineni et al. 2002, as sacrebleu implements it)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(list(predictions), _streams(references)).score)


def chrf(references: References, predictions: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100; with several references,
    each sentence is scored against its best-matching one (Popović 2015, as sacrebleu implements it)."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(predictions), _streams(references)).score)


def generation(references: References, predictions: Sequence[str]) -> tuple[dict[str, float], dict[str, Stat]]:
    """All generation metrics, and a resamplable version of each. ``references``: one string per
    example, or a list of gold answers per example (each metric's own multi-reference rule)."""
    refs, preds = _multi(references), list(predictions)
    per_example = rouge(refs, preds) | {"exact_match": exact_match(refs, preds)}
    arrays = {k: np.asarray(v, dtype=float) for k, v in per_example.items()}
    stats: dict[str, Stat] = {k: (lambda idx, a=a: float(a[idx].mean())) for k, a in arrays.items()}
    stats["bleu"] = lambda idx: bleu([refs[i] for i in idx], [preds[i] for i in idx])
    stats["chrf"] = lambda idx: chrf([refs[i] for i in idx], [preds[i] for i in idx])
    everything = np.arange(len(refs))
    return {k: stat(everything) for k, stat in stats.items()}, stats


def language_model(nll: Sequence[float], counts: Sequence[int]) -> tuple[dict[str, float], dict[str, Stat]]:
    """Loss per target token and perplexity = exp(loss) over examples, from each example's summed
    negative log-likelihood (nats) and its number of target tokens; resamplable (a resample's
    perplexity pools its examples' tokens, as the full-set value does)."""
    s, c = np.asarray(nll, dtype=float), np.asarray(counts, dtype=float)

    def loss(idx: np.ndarray) -> float:
        return float(s[idx].sum() / max(c[idx].sum(), 1.0))

    stats: dict[str, Stat] = {"loss": loss, "perplexity": lambda idx: math.exp(min(loss(idx), 50.0))}
    everything = np.arange(len(s))
    return {k: stat(everything) for k, stat in stats.items()}, stats


LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def headline(task: str, metric: str = "auto") -> str:
    """The metric that ranks systems (``eval.metric``): as set, else accuracy (classification),
    ROUGE-L (instruction, chat) or perplexity (text)."""
    if metric != "auto":
        return metric
    return {"classification": "accuracy", "text": "perplexity"}.get(task, "rougeL")


def better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is better than ``b`` (lower for loss and perplexity)."""
    return a < b if metric in LOWER_IS_BETTER else a > b


# ---------------------------------------------------------------- uncertainty


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(stat: Stat, n: int, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``n`` examples."""
    if n == 0:
        return (float("nan"), float("nan"))
    values = np.array([stat(idx) for idx in resample_indices(n, resamples, seed)])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def paired_p_value(stat_a: Stat, stat_b: Stat, n: int, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value for "A and B score the same" on the same ``n`` examples.

    The resampled differences, shifted to centre on zero (the null), are compared with the
    observed difference: p = (1 + #{|d* - d| >= |d|}) / (1 + resamples).
    """
    if n == 0:
        return float("nan")
    everything = np.arange(n)
    observed = stat_a(everything) - stat_b(everything)
    diffs = np.array([stat_a(idx) - stat_b(idx) for idx in resample_indices(n, resamples, seed)])
    extreme = np.sum(np.abs(diffs - observed) >= abs(observed) - 1e-12)
    return float((1 + extreme) / (1 + resamples))


def p_text(p: float, floor: float | None = None) -> str:
    """A p-value as people read it: three decimals, "<0.001", or "<=0.005" where a bootstrap's
    smallest possible value (``floor`` = 1 / (1 + resamples): no resample was as extreme) was hit,
    since the true p may be far smaller."""
    if p < 0.001:
        return "<0.001"
    return f"<={floor:.3f}" if floor is not None and p <= floor * (1 + 1e-9) else f"{p:.3f}"


def p_is(p: float, floor: float | None = None) -> str:
    """"p=0.012", "p<0.001" or "p<=0.005" (see ``p_text``), for running text."""
    text = p_text(p, floor)
    return f"p{text}" if text[0] == "<" else f"p={text}"


def with_intervals(values: dict[str, float], stats: dict[str, Stat], n: int, resamples: int = RESAMPLES,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "low", "high"}}`` for every metric that has a resamplable stat."""
    out = {}
    for name, stat in stats.items():
        low, high = interval(stat, n, resamples, seed)
        out[name] = {"value": float(values[name]), "low": low, "high": high}
    return out
