"""Train / validation / test index splits: seeded, optionally stratified by label and grouped.

Stratified splits use scikit-learn's ``train_test_split(stratify=...)`` (test first, then
validation out of the rest), so each split's label shares track the whole data set.

Grouped splits (rows that must stay together: one user's messages, one document's chunks,
all near-duplicates of one text) use a seeded greedy assignment rather than
``GroupShuffleSplit``: the latter sizes splits by *number of groups*, so with uneven groups
the row counts drift far from what was asked. Here groups are placed largest first (ties in
seeded random order) into the split whose label counts fall furthest short of their targets,
which also keeps label shares close when labels are given (close, not within one point: whole
groups move together).

Ordered splits (``ordered=True``, for time-ordered data whose rows run oldest first): the test
rows are the last ones, the validation rows the ones just before them, train the rest, so nothing
is trained on rows newer than those it is tested on. Nothing is drawn; labels and groups do not
apply.

Rare labels (stratified, ungrouped): a label with fewer rows than there are splits to fill
cannot appear in every split; its rows all go to train (training on them costs nothing, while
a one-row evaluation class measures nothing) and a ``UserWarning`` names the label. Other
impossible requests raise ``ValueError`` saying what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["split_indices"]

SPLITS = ("train", "validation", "test")


def split_indices(n: int, *, validation: float = 0.1, test: float = 0.1,
                  labels: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                  seed: int = 0, ordered: bool = False) -> dict[str, list[int]]:
    """Row indices (each list sorted) for "train", "validation" and "test".

    ``validation`` and ``test`` are fractions of ``n`` when below 1, row counts when >= 1, and
    0 for no such split (its list is empty). A non-zero fraction gets at least one row. The same
    arguments always give the same split. ``ordered``: the last rows are the test split, the ones
    before them validation (rows in time order, newest last).
    """
    if ordered and (labels is not None or groups is not None):
        raise ValueError("an ordered split takes the newest rows as they come; it cannot be stratified or grouped")
    if n < 1:
        raise ValueError(f"cannot split {n} rows")
    for name, seq in (("labels", labels), ("groups", groups)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} rows")
    sizes = {"validation": _size(n, validation, "validation"), "test": _size(n, test, "test")}
    if sizes["validation"] + sizes["test"] >= n:
        raise ValueError(
            f"validation ({sizes['validation']}) + test ({sizes['test']}) rows leave no training "
            f"rows out of {n}; make them smaller"
        )
    if ordered:
        n_train = n - sizes["validation"] - sizes["test"]
        out = {"train": np.arange(n_train), "validation": np.arange(n_train, n_train + sizes["validation"]),
               "test": np.arange(n_train + sizes["validation"], n)}
    elif groups is not None:
        out = _grouped(n, sizes, labels, groups, seed)
    elif labels is not None:
        out = _stratified(n, sizes, labels, seed)
    else:
        order = np.random.default_rng(seed).permutation(n)
        n_test, n_val = sizes["test"], sizes["validation"]
        out = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
               "train": order[n_test + n_val:]}
    return {name: sorted(int(i) for i in out[name]) for name in SPLITS}


def _size(n: int, size: float, name: str) -> int:
    """Rows for a split: a fraction (< 1) of n, at least 1 when non-zero, or a whole count."""
    if size < 0:
        raise ValueError(f"{name} size must be >= 0, got {size}")
    if size == 0:
        return 0
    if size < 1:
        return max(1, int(round(n * size)))
    if size != int(size):
        raise ValueError(f"{name} size {size} is neither a fraction below 1 nor a whole row count")
    return int(size)


def _rare_labels(labels: Sequence[str], rows: np.ndarray, n_splits: int) -> set[str]:
    """Labels with too few rows to appear in every split being made; warns naming them."""
    values, counts = np.unique(np.asarray(labels, dtype=object)[rows].astype(str), return_counts=True)
    rare = {str(v) for v, c in zip(values, counts) if c < n_splits}
    if rare:
        warnings.warn(
            f"labels with fewer than {n_splits} rows go to train only (cannot be stratified): "
            + ", ".join(repr(r) for r in sorted(rare)),
            UserWarning, stacklevel=3,
        )
    return rare


def _stratified(n: int, sizes: dict[str, int], labels: Sequence[str],
                seed: int) -> dict[str, np.ndarray]:
    """Test, then validation, drawn with sklearn's stratified train_test_split."""
    y = np.asarray([str(v) for v in labels], dtype=object)
    all_rows = np.arange(n)
    n_splits = 1 + sum(1 for s in sizes.values() if s)
    rare = _rare_labels(y, all_rows, n_splits)
    pool = np.array([i for i in all_rows if y[i] not in rare], dtype=np.int64)
    out = {"train": np.array([i for i in all_rows if y[i] in rare], dtype=np.int64)}
    for offset, name in enumerate(("test", "validation")):
        want = sizes[name]
        if not want:
            out[name] = np.empty(0, dtype=np.int64)
            continue
        classes = len(set(y[pool]))
        if want < classes or len(pool) - want < classes:
            raise ValueError(
                f"{name} split of {want} rows (with {len(pool) - want} left) cannot hold a row of "
                f"each of the {classes} labels; make it larger or pass labels=None"
            )
        pool, out[name] = train_test_split(pool, test_size=want, random_state=seed + offset,
                                           stratify=y[pool])
    out["train"] = np.concatenate([out["train"], pool])
    return out


def _grouped(n: int, sizes: dict[str, int], labels: Sequence[str] | None,
             groups: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """Whole groups into splits, greedily matching per-label row targets (see module doc)."""
    g_ids, g_of_row = np.unique(np.asarray([str(g) for g in groups], dtype=object), return_inverse=True)
    y = np.asarray([""] * n if labels is None else [str(v) for v in labels], dtype=object)
    l_ids, l_of_row = np.unique(y, return_inverse=True)
    wanted = [name for name in SPLITS if name == "train" or sizes[name]]
    if len(g_ids) < len(wanted):
        raise ValueError(
            f"only {len(g_ids)} distinct group(s) for {len(wanted)} splits; a group cannot span "
            "two splits, so give more groups or ask for fewer splits"
        )
    counts = np.zeros((len(g_ids), len(l_ids) + 1), dtype=np.int64)  # rows per group and label
    np.add.at(counts, (g_of_row, l_of_row), 1)
    counts[:, -1] = counts[:, :-1].sum(axis=1)  # last column: all rows, so sizes are matched too
    share = np.append(np.bincount(l_of_row, minlength=len(l_ids)) / n, 1.0)
    rows_for = {"validation": sizes["validation"], "test": sizes["test"]}
    rows_for["train"] = n - rows_for["validation"] - rows_for["test"]
    target = np.array([rows_for[s] * share for s in wanted])  # (splits, labels + total)
    filled = np.zeros_like(target)
    tie = np.random.default_rng(seed).permutation(len(g_ids))
    order = np.lexsort((tie, -counts[:, -1]))  # largest groups first, seeded ties
    where = np.empty(len(g_ids), dtype=np.int64)
    for g in order:
        # Cost change of adding the group to each split: sum over labels (and the total) of
        # the change in squared shortfall, (f + c - t)^2 - (f - t)^2 = c * (2 (f - t) + c).
        delta = (counts[g] * (2 * (filled - target) + counts[g])).sum(axis=1)
        where[g] = int(np.argmin(delta))
        filled[where[g]] += counts[g]
    out = {name: np.flatnonzero(where[g_of_row] == k) for k, name in enumerate(wanted)}
    for name in SPLITS:
        if name not in out:
            out[name] = np.empty(0, dtype=np.int64)
        elif not len(out[name]):
            biggest = int(counts[:, -1].max())
            raise ValueError(
                f"{name} split came out empty: the groups are too large for a {rows_for[name]}-row "
                f"{name} split (largest group has {biggest} rows); make it larger or split the groups"
            )
    return out
