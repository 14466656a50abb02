"""Seeded train / validation / test splits (tunesmith.data.split)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.data.split import split_indices

SMS = Path(__file__).resolve().parents[1] / "examples" / "data" / "sms_spam" / "SMSSpamCollection"


def check_partition(splits: dict[str, list[int]], n: int) -> None:
    """Disjoint, covering every row once, each list sorted."""
    assert set(splits) == {"train", "validation", "test"}
    everything = splits["train"] + splits["validation"] + splits["test"]
    assert sorted(everything) == list(range(n))
    for rows in splits.values():
        assert rows == sorted(rows)


def share(rows: list[int], labels: list[str], label: str) -> float:
    return sum(labels[i] == label for i in rows) / len(rows)


def test_deterministic_by_seed_disjoint_and_covering():
    a = split_indices(1000, seed=3)
    assert a == split_indices(1000, seed=3)
    assert a != split_indices(1000, seed=4)
    check_partition(a, 1000)


@pytest.mark.parametrize("validation, test, sizes", [
    (0.1, 0.1, (800, 100, 100)),
    (50, 25, (925, 50, 25)),
    (0.2, 0, (800, 200, 0)),
    (0, 0, (1000, 0, 0)),
    (0.0001, 1, (998, 1, 1)),  # a non-zero fraction gets at least one row
])
def test_sizes_by_fraction_and_count(validation, test, sizes):
    splits = split_indices(1000, validation=validation, test=test)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == sizes
    check_partition(splits, 1000)


def test_stratified_shares_within_one_point():
    rng = random.Random(0)
    labels = rng.choices(["a", "b", "c"], weights=[0.7, 0.2, 0.1], k=2000)
    splits = split_indices(2000, labels=labels, seed=1)
    check_partition(splits, 2000)
    assert splits == split_indices(2000, labels=labels, seed=1)
    for label in "abc":
        whole = labels.count(label) / 2000
        for rows in splits.values():
            assert abs(share(rows, labels, label) - whole) <= 0.01


def test_rare_label_goes_to_train_with_a_warning():
    labels = ["a"] * 50 + ["b"] * 49 + ["lonely"]
    with pytest.warns(UserWarning, match="'lonely'"):
        splits = split_indices(100, labels=labels)
    assert 99 in splits["train"]
    check_partition(splits, 100)


def test_grouped_never_spans_splits():
    rng = random.Random(0)
    groups = [f"user{rng.randrange(150)}" for _ in range(1500)]
    splits = split_indices(1500, groups=groups, seed=2)
    check_partition(splits, 1500)
    where = {}
    for name, rows in splits.items():
        for i in rows:
            assert where.setdefault(groups[i], name) == name
    assert abs(len(splits["validation"]) - 150) <= 15 and abs(len(splits["test"]) - 150) <= 15
    assert splits == split_indices(1500, groups=groups, seed=2)


def test_grouped_and_stratified():
    rng = random.Random(1)
    groups = [f"g{rng.randrange(600)}" for _ in range(3000)]
    labels = ["spam" if rng.random() < 0.15 else "ham" for _ in range(3000)]
    splits = split_indices(3000, labels=labels, groups=groups)
    check_partition(splits, 3000)
    assert len({groups[i] for i in splits["test"]} & {groups[i] for i in splits["train"]}) == 0
    whole = labels.count("spam") / 3000
    for rows in splits.values():
        assert abs(share(rows, labels, "spam") - whole) <= 0.02


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=10, validation=5, test=5), "leave no training rows"),
    (dict(n=10, validation=0.5, test=0.5), "leave no training rows"),
    (dict(n=10, validation=-1), "must be >= 0"),
    (dict(n=10, validation=2.5), "neither a fraction"),
    (dict(n=0), "cannot split 0 rows"),
    (dict(n=10, labels=["a"] * 9), "labels has 9 entries for 10 rows"),
    (dict(n=20, test=1, labels=["a", "b"] * 10), "cannot hold a row of each of the 2 labels"),
    (dict(n=10, groups=["x"] * 5 + ["y"] * 5), "only 2 distinct group"),
    (dict(n=101, groups=["a"] * 50 + ["b"] * 50 + ["c"]), "test split came out empty"),
])
def test_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_indices(**kwargs)


@pytest.mark.skipif(not SMS.exists(), reason="examples/data/sms_spam not present")
def test_sms_spam_stratified_80_10_10_keeps_spam_share():
    lines = SMS.read_bytes().decode("utf-8", errors="replace").split("\n")[1:]
    labels = [line.split("\t", 1)[0] for line in lines if "\t" in line]
    assert Counter(labels) == {"ham": 4827, "spam": 747}
    splits = split_indices(len(labels), validation=0.1, test=0.1, labels=labels, seed=0)
    check_partition(splits, len(labels))
    whole = labels.count("spam") / len(labels)
    for rows in splits.values():
        assert abs(share(rows, labels, "spam") - whole) <= 0.01
