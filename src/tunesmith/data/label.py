"""Weak labeling: user-written labeling functions, their analysis, and a label model.

A labeling function (LF) looks at one text and returns a label or ``ABSTAIN`` (None). Users
write them in a plain Python file; ``load_labeling_functions`` imports it and collects the
decorated functions. ``apply_lfs`` turns texts into an (n, m) label matrix (-1 = abstain),
``lf_summary`` gives Snorkel's LFAnalysis numbers (coverage, overlap, conflict, accuracy on
gold), and the labels are combined by majority vote or a Dawid–Skene label model fitted by EM.

Why our own Dawid–Skene rather than Snorkel: Snorkel installs, but pulls in pandas,
tensorboard, grpcio and protobuf for what is ~80 lines of numpy here, and its LabelModel
refuses fewer than three LFs. The model here treats "abstain" as one of the outcomes an LF
can produce, so LFs that only ever vote for one class (most keyword LFs) still carry
information: how often they fire on each class.
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError

import functools
import importlib.machinery
import importlib.util
import itertools
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

ABSTAIN = None  # what a labeling function returns when its clue is absent
_ABSTAIN_ID = -1  # how an abstain is stored in a label matrix
_order = itertools.count()  # creation order, so a file's LFs come back in definition order


class LabelingError(TunesmithError, ValueError):
    """A problem with labeling functions or their output; the message says which and where."""


class LFFileNotFoundError(LabelingError):
    """The labeling-function file does not exist (or is not a file)."""


class LFSyntaxError(LabelingError):
    """The labeling-function file is not valid Python; the message gives file and line."""


class LFImportError(LabelingError):
    """Running the labeling-function file raised an exception."""


class NoLabelingFunctionsError(LabelingError):
    """The file defines no function decorated with ``@labeling_function``."""


class LFApplyError(LabelingError):
    """A labeling function raised or returned a bad value on one row."""

    def __init__(self, message: str, lf_name: str, row: int) -> None:
        super().__init__(message)
        self.lf_name = lf_name
        self.row = row


class LabelingFunction:
    """A callable ``text -> label | ABSTAIN`` with a name (used in matrices, summaries, errors)."""

    def __init__(self, func: Callable[[str], str | None], name: str | None = None) -> None:
        functools.update_wrapper(self, func)  # keep __name__, __doc__, __module__
        self.func = func
        self.name = name or func.__name__
        self.order = next(_order)

    def __call__(self, text: str) -> str | None:
        return self.func(text)

    def __repr__(self) -> str:
        return f"LabelingFunction({self.name!r})"


def labeling_function(name: str | None = None) -> Callable[[Callable[[str], str | None]], LabelingFunction]:
    """Mark ``f(text) -> label | ABSTAIN`` as a labeling function, named ``name`` or its own name.

    Use as ``@labeling_function()`` or ``@labeling_function("name")``; a bare
    ``@labeling_function`` also works, since forgetting the parentheses is an easy slip.
    """
    if callable(name):  # bare decorator: `name` is the function itself
        return LabelingFunction(name)  # type: ignore[return-value]

    def wrap(func: Callable[[str], str | None]) -> LabelingFunction:
        return LabelingFunction(func, name)

    return wrap


def load_labeling_functions(path: str | Path) -> list[LabelingFunction]:
    """Import a user's Python file and return its labeling functions in definition order."""
    path = Path(path)
    if not path.is_file():
        raise LFFileNotFoundError(f"{path}: labeling-function file not found")
    module_name = f"_tunesmith_lfs_{path.stem}_{abs(hash(str(path.resolve())))}"
    # An explicit loader so any file name works (spec_from_file_location wants ".py" otherwise).
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling inside the file need this
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[module_name]
        where = f"{path}:{e.lineno}" if e.lineno else str(path)
        snippet = f": {e.text.strip()}" if e.text else ""
        raise LFSyntaxError(f"{where}: syntax error: {e.msg}{snippet}") from e
    except Exception as e:
        del sys.modules[module_name]
        raise LFImportError(f"{path}{_line_in(e, path)}: importing raised {type(e).__name__}: {e}") from e
    found = {id(v): v for v in vars(module).values() if isinstance(v, LabelingFunction)}
    lfs = sorted(found.values(), key=lambda lf: lf.order)
    if not lfs:
        raise NoLabelingFunctionsError(
            f"{path}: no labeling functions found; decorate each with @labeling_function() "
            "from tunesmith.data.label"
        )
    _check_unique_names([lf.name for lf in lfs], str(path))
    return lfs


def _line_in(exc: BaseException, path: Path) -> str:
    """':LINE' of the deepest frame of ``exc`` inside ``path``, so import errors point at user code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f":{frames[-1].lineno}" if frames else ""


def _check_unique_names(names: Sequence[str], where: str) -> None:
    """Names identify LFs in the summary and in errors, so two LFs may not share one."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LabelingError(f"{where}: labeling-function names must be unique; repeated: {', '.join(dupes)}")


@dataclass
class LabelMatrix:
    """The votes of m LFs on n texts: ``L[i, j]`` is an index into ``labels``, or -1 for abstain."""

    L: np.ndarray  # (n, m) int64
    labels: list[str]  # the label vocabulary; column values index into it
    lf_names: list[str]

    @property
    def covered(self) -> np.ndarray:
        """(n,) bool: rows where at least one LF voted."""
        return (self.L != _ABSTAIN_ID).any(axis=1)


def apply_lfs(
    lfs: Sequence[LabelingFunction | Callable[[str], str | None]],
    texts: Sequence[str],
    labels: Sequence[str] | None = None,
) -> LabelMatrix:
    """Run every LF on every text. The vocabulary is ``labels`` if given, else the sorted union of votes.

    An exception inside an LF is re-raised as LFApplyError naming the function and row (the
    original is chained), because a silently dropped vote would skew every number downstream.
    """
    if not lfs:
        raise LabelingError("no labeling functions given")
    names = [getattr(lf, "name", getattr(lf, "__name__", repr(lf))) for lf in lfs]
    _check_unique_names(names, "apply_lfs")
    votes: list[list[str | None]] = []  # per LF, per row
    for lf, name in zip(lfs, names, strict=True):
        column = []
        for i, text in enumerate(texts):
            try:
                out = lf(text)
            except Exception as e:
                raise LFApplyError(
                    f"labeling function {name!r} raised {type(e).__name__} on row {i} "
                    f"({_preview(text)}): {e}", name, i) from e
            if out is not ABSTAIN and not isinstance(out, str):
                raise LFApplyError(
                    f"labeling function {name!r} returned {out!r} ({type(out).__name__}) on row {i}; "
                    "return a label string or ABSTAIN (None)", name, i)
            column.append(out)
        votes.append(column)
    vocab = list(labels) if labels is not None else sorted({v for col in votes for v in col if v is not None})
    index = {lab: k for k, lab in enumerate(vocab)}
    L = np.full((len(texts), len(lfs)), _ABSTAIN_ID, dtype=np.int64)
    for j, column in enumerate(votes):
        for i, v in enumerate(column):
            if v is None:
                continue
            if v not in index:
                raise LFApplyError(
                    f"labeling function {names[j]!r} returned {v!r} on row {i}, "
                    f"which is not one of the labels {vocab}", names[j], i)
            L[i, j] = index[v]
    return LabelMatrix(L, vocab, names)


def _preview(text: Any, n: int = 60) -> str:
    s = repr(text)
    return s if len(s) <= n else s[: n - 3] + "..."


def _as_array(L: LabelMatrix | np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """The (n, m) int matrix behind ``L``, checked: only -1 and valid class indices."""
    arr = L.L if isinstance(L, LabelMatrix) else np.asarray(L)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise LabelingError(f"a label matrix must be a 2-D integer array, got shape {arr.shape} {arr.dtype}")
    top = n_classes if n_classes is not None else np.iinfo(np.int64).max
    if arr.size and (arr.min() < _ABSTAIN_ID or arr.max() >= top):
        raise LabelingError(f"label matrix values must be -1 (abstain) or in [0, {top}); "
                            f"found {arr.min()}..{arr.max()}")
    return arr.astype(np.int64, copy=False)


def lf_summary(
    L: LabelMatrix | np.ndarray,
    lfs: Sequence[LabelingFunction | str],
    gold: Sequence[str | None] | None = None,
    labels: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per LF: polarity, coverage, overlap, conflict (fractions of all rows, as Snorkel's LFAnalysis),
    and where ``gold`` has labels: correct, incorrect, accuracy and ``n_gold`` (the rows it used).

    overlap: rows this LF labels where another LF also labels; conflict: rows this LF labels
    where another LF gives a different label. Accuracy counts only rows with a gold label that
    this LF labels; it is None when there are none. ``labels`` maps class indices to names
    (taken from a LabelMatrix; needed with a plain array and gold).
    """
    arr = _as_array(L)
    vocab = list(labels) if labels is not None else (L.labels if isinstance(L, LabelMatrix) else None)
    names = [lf if isinstance(lf, str) else lf.name for lf in lfs]
    n, m = arr.shape
    if len(names) != m:
        raise LabelingError(f"{len(names)} labeling functions for a matrix with {m} columns")
    voted = arr != _ABSTAIN_ID  # (n, m)
    n_voting = voted.sum(axis=1)  # (n,)
    y = _gold_indices(gold, n, vocab) if gold is not None else None
    rows = []
    for j, name in enumerate(names):
        col, on = arr[:, j], voted[:, j]
        others_differ = ((arr != col[:, None]) & voted).any(axis=1)  # another LF voted something else
        row: dict[str, Any] = {
            "name": name,
            "polarity": sorted(vocab[k] if vocab else int(k) for k in np.unique(col[on])),
            "coverage": _frac(on.sum(), n),
            "overlap": _frac((on & (n_voting > 1)).sum(), n),
            "conflict": _frac((on & others_differ).sum(), n),
        }
        if y is not None:
            used = on & (y != _NO_GOLD)
            correct = int((col[used] == y[used]).sum())
            row.update(correct=correct, incorrect=int(used.sum()) - correct, n_gold=int(used.sum()),
                       accuracy=_frac(correct, used.sum()) if used.any() else None)
        rows.append(row)
    return rows


_NO_GOLD = -2  # a row without a gold label
_UNKNOWN_GOLD = -3  # a gold label outside the vocabulary: every vote on it is wrong


def _gold_indices(gold: Sequence[str | None], n: int, vocab: Sequence[str] | None) -> np.ndarray:
    """Gold labels as class indices (-2 where missing, -3 where no LF can produce the label)."""
    if len(gold) != n:
        raise LabelingError(f"gold has {len(gold)} labels for {n} rows")
    if vocab is None:
        raise LabelingError("gold labels need the label vocabulary: pass a LabelMatrix or labels=")
    index = {lab: k for k, lab in enumerate(vocab)}
    return np.array([_NO_GOLD if g is None else index.get(g, _UNKNOWN_GOLD) for g in gold], dtype=np.int64)


def _frac(a: int | np.integer, b: int | np.integer) -> float:
    return float(a) / float(b) if b else 0.0


def majority_vote(
    L: LabelMatrix | np.ndarray, n_classes: int, ties: Literal["lowest", "abstain"] = "lowest"
) -> np.ndarray:
    """(n,) class index with the most votes; -1 where no LF voted.

    Ties go to the lowest class index by default (deterministic, and every covered row gets a
    label, so it compares with a label model on the same rows); ``ties="abstain"`` gives -1.
    """
    arr = _as_array(L, n_classes)
    counts = _vote_counts(arr, n_classes)  # (n, K)
    pred = counts.argmax(axis=1)  # argmax returns the first maximum: the lowest index
    pred[counts.sum(axis=1) == 0] = _ABSTAIN_ID
    if ties == "abstain":
        top = counts.max(axis=1, keepdims=True)
        pred[((counts == top).sum(axis=1) > 1) & (top[:, 0] > 0)] = _ABSTAIN_ID
    return pred


def _vote_counts(arr: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, K) how many LFs voted for each class on each row."""
    counts = np.zeros((arr.shape[0], n_classes), dtype=np.int64)
    for j in range(arr.shape[1]):
        on = arr[:, j] != _ABSTAIN_ID
        np.add.at(counts, (np.nonzero(on)[0], arr[on, j]), 1)
    return counts


class DawidSkene:
    """Dawid–Skene label model: a latent true class per row, each LF conditionally independent given it.

    Parameters, estimated by EM: ``class_priors_`` (K,) and ``confusion_`` (m, K, K+1), where
    ``confusion_[j, c, 0]`` is P(LF j abstains | class c) and ``confusion_[j, c, 1 + k]`` is
    P(LF j votes k | class c). Modelling abstains is what lets one-sided keyword LFs count.
    ``smoothing`` is the weight (in pseudo-rows) of a Dirichlet prior on each confusion row,
    shaped like that LF's own outcome rates over all rows: "this LF fires as often on every
    class", i.e. uninformative but honest about its coverage. A flat prior instead (+1 to
    abstain and to each vote) would claim a 5%-coverage keyword LF fires on the wrong class a
    third of the time, which swamps small data sets. The prior keeps every probability above
    zero (no log 0); class priors get ``smoothing`` added to each class.
    EM starts from the soft majority vote (each covered row's vote shares), so classes keep
    their meaning and the result is deterministic. ``predict_proba`` gives the posterior for
    every row, uncovered ones too (there it is only the prior tilted by abstain rates);
    ``predict`` returns -1 for rows no LF covers.
    """

    def __init__(self, n_classes: int, max_iter: int = 100, tol: float = 1e-6, smoothing: float = 1.0) -> None:
        if n_classes < 1:
            raise LabelingError(f"n_classes must be at least 1, got {n_classes}")
        if smoothing <= 0:
            raise LabelingError(f"smoothing must be > 0 (it keeps log-probabilities finite), got {smoothing}")
        self.n_classes, self.max_iter, self.tol, self.smoothing = n_classes, max_iter, tol, smoothing
        self.class_priors_: np.ndarray | None = None
        self.confusion_: np.ndarray | None = None
        self.n_iter_ = 0
        self.converged_ = False
        self.log_likelihood_ = float("nan")  # mean per row, at the last E-step

    def fit(self, L: LabelMatrix | np.ndarray) -> DawidSkene:
        """Estimate priors and confusion matrices by EM, until the mean log-likelihood moves < ``tol``."""
        arr = _as_array(L, self.n_classes)
        if arr.shape[0] == 0:
            raise LabelingError("cannot fit a label model on zero rows")
        resp = self._init_responsibilities(arr)  # (n, K)
        outcomes = np.eye(self.n_classes + 1)[arr + 1]  # (n, m, K+1): one-hot of abstain / vote k
        rates = outcomes.mean(axis=0) + 1e-3  # (m, K+1); the 1e-3 keeps never-seen outcomes possible
        prior = self.smoothing * rates / rates.sum(axis=1, keepdims=True)  # (m, K+1) pseudo-counts
        prev = -np.inf
        self.converged_ = False
        for it in range(1, self.max_iter + 1):
            self.n_iter_ = it
            self._m_step(outcomes, resp, prior)
            resp, ll = self._e_step(arr)
            self.log_likelihood_ = ll
            if abs(ll - prev) < self.tol:
                self.converged_ = True
                break
            prev = ll
        return self

    def predict_proba(self, L: LabelMatrix | np.ndarray) -> np.ndarray:
        """(n, K) posterior class probabilities under the fitted model."""
        return self._e_step(self._checked(L))[0]

    def predict(self, L: LabelMatrix | np.ndarray) -> np.ndarray:
        """(n,) most probable class, ties to the lowest index; -1 where no LF voted."""
        arr = self._checked(L)
        pred = self._e_step(arr)[0].argmax(axis=1)
        pred[(arr == _ABSTAIN_ID).all(axis=1)] = _ABSTAIN_ID
        return pred

    def lf_accuracies(self) -> np.ndarray:
        """(m,) the model's estimate of P(vote is right | LF votes): a gold-free quality score."""
        if self.confusion_ is None or self.class_priors_ is None:
            raise LabelingError("the label model is not fitted; call fit(L) first")
        k = np.arange(self.n_classes)
        right = (self.class_priors_ * self.confusion_[:, k, k + 1]).sum(axis=1)  # (m,)
        votes = (self.class_priors_ * (1.0 - self.confusion_[:, :, 0])).sum(axis=1)  # (m,)
        return right / votes

    def _checked(self, L: LabelMatrix | np.ndarray) -> np.ndarray:
        if self.confusion_ is None:
            raise LabelingError("the label model is not fitted; call fit(L) first")
        arr = _as_array(L, self.n_classes)
        if arr.shape[1] != self.confusion_.shape[0]:
            raise LabelingError(f"the model was fitted on {self.confusion_.shape[0]} LFs, got {arr.shape[1]}")
        return arr

    def _init_responsibilities(self, arr: np.ndarray) -> np.ndarray:
        """Soft majority vote; uncovered rows get the covered rows' average (uniform if none)."""
        counts = _vote_counts(arr, self.n_classes).astype(np.float64)  # (n, K)
        total = counts.sum(axis=1, keepdims=True)
        covered = total[:, 0] > 0
        resp = np.full_like(counts, 1.0 / self.n_classes)
        resp[covered] = counts[covered] / total[covered]
        if covered.any():
            resp[~covered] = resp[covered].mean(axis=0)
        return resp

    def _m_step(self, outcomes: np.ndarray, resp: np.ndarray, prior: np.ndarray) -> None:
        """Priors and confusion matrices from expected counts plus the prior's pseudo-counts (MAP)."""
        counts = np.einsum("ic,imv->mcv", resp, outcomes) + prior[:, None, :]  # (m, K, K+1)
        self.confusion_ = counts / counts.sum(axis=2, keepdims=True)
        priors = resp.sum(axis=0) + self.smoothing
        self.class_priors_ = priors / priors.sum()

    def _e_step(self, arr: np.ndarray) -> tuple[np.ndarray, float]:
        """Posterior (n, K) and mean log-likelihood, computed in log space so many LFs don't underflow."""
        assert self.confusion_ is not None and self.class_priors_ is not None
        log_conf = np.log(self.confusion_)  # (m, K, K+1)
        lfs = np.arange(arr.shape[1])[None, :]  # (1, m)
        per_lf = log_conf[lfs, :, arr + 1]  # (n, m, K): log P(observed outcome of LF j | class)
        log_joint = np.log(self.class_priors_)[None, :] + per_lf.sum(axis=1)  # (n, K)
        top = log_joint.max(axis=1, keepdims=True)
        log_norm = top + np.log(np.exp(log_joint - top).sum(axis=1, keepdims=True))  # logsumexp
        return np.exp(log_joint - log_norm), float(log_norm.mean())


@dataclass
class WeakLabelResult:
    """What ``weak_label`` found: a label per row (None where no LF voted) and how it got there."""

    labels: list[str | None]
    uncovered: int  # rows no LF voted on
    summary: list[dict[str, Any]]  # lf_summary rows (with gold accuracy when gold was given)
    matrix: LabelMatrix
    model: DawidSkene | None = None  # the fitted label model (None for model="majority")
    proba: np.ndarray | None = None  # (n, K) label-model posteriors, columns in matrix.labels order
    gold_eval: dict[str, Any] | None = field(default=None)  # majority vs label model on covered gold rows


def weak_label(
    texts: Sequence[str],
    lfs: Sequence[LabelingFunction | Callable[[str], str | None]] | str | Path,
    model: Literal["dawid_skene", "majority"] = "dawid_skene",
    gold: Sequence[str | None] | None = None,
    labels: Sequence[str] | None = None,
) -> WeakLabelResult:
    """Apply LFs (a list, or a file to load them from), combine their votes, and label every row.

    With ``gold``, also scores majority vote and the label model on the gold rows that some LF
    covers, so the choice of combiner is a measured one.
    """
    if model not in ("dawid_skene", "majority"):
        raise LabelingError(f"model must be 'dawid_skene' or 'majority', got {model!r}")
    if isinstance(lfs, (str, Path)):
        lfs = load_labeling_functions(lfs)
    matrix = apply_lfs(lfs, texts, labels)
    k = len(matrix.labels)
    summary = lf_summary(matrix, matrix.lf_names, gold)
    if k == 0 or len(texts) == 0:  # no votes at all: nothing to combine
        return WeakLabelResult([None] * len(texts), len(texts), summary, matrix)
    mv = majority_vote(matrix, k)
    use_ds = model == "dawid_skene"
    # The label model is also fitted under model="majority" when gold is given, to compare the two.
    ds = DawidSkene(k).fit(matrix) if use_ds or gold is not None else None
    ds_pred = ds.predict(matrix) if ds is not None else None
    pred = ds_pred if use_ds and ds_pred is not None else mv
    return WeakLabelResult(
        labels=[matrix.labels[p] if p >= 0 else None for p in pred],
        uncovered=int((pred < 0).sum()),
        summary=summary,
        matrix=matrix,
        model=ds if use_ds else None,
        proba=ds.predict_proba(matrix) if use_ds and ds is not None else None,
        gold_eval=_gold_eval(matrix, gold, mv, ds_pred) if gold is not None and ds_pred is not None else None,
    )


def _gold_eval(matrix: LabelMatrix, gold: Sequence[str | None], mv: np.ndarray, ds: np.ndarray) -> dict[str, Any]:
    """Accuracy of both combiners on rows that have gold and are covered by some LF."""
    y = _gold_indices(gold, len(mv), matrix.labels)
    has_gold = y != _NO_GOLD
    rows = has_gold & matrix.covered
    n = int(rows.sum())
    return {
        "n_gold": int(has_gold.sum()),
        "n_covered": n,
        "coverage": _frac(n, has_gold.sum()),
        "majority_accuracy": _frac((mv[rows] == y[rows]).sum(), n) if n else None,
        "dawid_skene_accuracy": _frac((ds[rows] == y[rows]).sum(), n) if n else None,
    }
