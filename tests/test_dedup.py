"""Exact / near-duplicate detection and split leakage (tunesmith.data.dedup)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from tunesmith.data.dedup import (
    DupPair, find_duplicates, find_leakage, minhash_signatures, normalize, shingle_hash,
)

SMS = Path(__file__).resolve().parents[1] / "examples" / "data" / "sms_spam" / "SMSSpamCollection"

# 30 words, so one changed word keeps the character 5-gram Jaccard near 0.9.
TEXT = ("the committee met on tuesday morning to review the budget for next year and "
        "agreed to postpone the decision about the new library until spring "
        "because several members were absent")
OTHER = ("please call me back when you get this message because i need to know whether "
         "we are still going to the concert on saturday night with your sister and her friends")


def one_word_changed(text: str, index: int, word: str) -> str:
    words = text.split()
    words[index] = word
    return " ".join(words)


def read_sms() -> tuple[list[str], list[str]]:
    """Labels and texts of the SMS Spam Collection (header line skipped, split on first tab)."""
    lines = SMS.read_bytes().decode("utf-8", errors="replace").split("\n")[1:]
    rows = [line.split("\t", 1) for line in lines if "\t" in line]
    return [r[0] for r in rows], [r[1] for r in rows]


def test_text_fixture_has_30_words():
    assert len(TEXT.split()) == 30


@pytest.mark.parametrize("raw, expected", [
    ("  Hello   WORLD!!! ", "hello world"),
    ("...Ok lar...", "ok lar"),
    ("ＦＵＬＬ　ｗｉｄｔｈ", "full width"),  # NFKC folds full-width letters and space
    ("ﬁne Straße", "fine strasse"),  # ligature (NFKC) and ß (casefold)
    ("call 0800-123.45 now", "call 0800-123.45 now"),  # inner punctuation stays
    ("\"quoted\"", "quoted"),
    (":-)", ":-)"),  # nothing but punctuation: kept, so emoticons do not all become ""
    ("", ""),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_signatures_equal_datasketch_minhash():
    texts = ["hello world this is a test", "abc", "", "héllo wörld 😀 ok", "x" * 40_000,
             "a b", "repeat repeat repeat repeat"]
    sig = minhash_signatures(texts, num_perm=64, ngram=5, seed=3)
    for text, row in zip(texts, sig):
        reference = MinHash(num_perm=64, seed=3, hashfunc=lambda s: shingle_hash(s, 5))
        shingles = [text[i:i + 5] for i in range(len(text) - 4)] if len(text) >= 5 else [text] * bool(text)
        reference.update_batch(shingles)
        assert np.array_equal(reference.hashvalues, row), text[:20]


def test_exact_duplicates_after_normalization_keep_first():
    texts = ["Hello world!", "something else", "hello   WORLD", "HELLO WORLD...", "something else"]
    result = find_duplicates(texts, near=False)
    assert result.exact == [[0, 2, 3], [1, 4]]
    assert result.keep == [0, 1]
    assert result.removed_exact == 3 and result.removed_near == 0 and result.near == []
    assert result.exact_examples[0] == DupPair("Hello world!", "hello   WORLD", 1.0)


def test_near_duplicate_one_word_changed_found_at_0_8():
    texts = [OTHER, TEXT, one_word_changed(TEXT, 12, "refused")]
    result = find_duplicates(texts, threshold=0.8)
    assert result.near == [[1, 2]]
    assert result.keep == [0, 1]
    assert result.removed_near == 1 and result.removed_exact == 0
    example = result.near_examples[0]
    assert (example.kept, example.removed) == (TEXT, texts[2]) and 0.8 <= example.jaccard < 1.0


def test_different_texts_are_not_near_duplicates():
    rng = random.Random(0)
    words = TEXT.split() + OTHER.split()
    texts = [" ".join(rng.sample(words, 20)) for _ in range(50)] + [TEXT, OTHER]
    result = find_duplicates(texts, threshold=0.8)
    assert result.near == [] and result.exact == []
    assert result.keep == list(range(len(texts)))


def test_union_find_merges_chains_into_one_cluster_keeping_first():
    a = TEXT
    b = one_word_changed(a, 5, "agreed")
    c = one_word_changed(b, 25, "several")
    d = one_word_changed(c, 28, "late")
    texts = [OTHER, d, a, b, c, a.upper()]  # later rows link back through the chain
    result = find_duplicates(texts, threshold=0.8)
    assert result.exact == [[2, 5]]
    assert result.near == [[1, 2, 3, 4]]
    assert result.keep == [0, 1]  # the first occurrence of the cluster is kept, order preserved
    assert result.removed_exact + result.removed_near + len(result.keep) == len(texts)


def test_near_off_and_bad_parameters():
    texts = [TEXT, one_word_changed(TEXT, 3, "x")]
    assert find_duplicates(texts, near=False).keep == [0, 1]
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates(texts, threshold=0.0)
    with pytest.raises(ValueError, match="num_perm"):
        find_duplicates(texts, num_perm=1)


def test_short_and_empty_texts():
    texts = ["ok", "Ok.", "", "", "hi", "k"]
    result = find_duplicates(texts)
    assert result.exact == [[0, 1], [2, 3]]
    assert result.keep == [0, 2, 4, 5]


def test_leakage_exact_and_near():
    train = [OTHER, "Some UNIQUE training row", one_word_changed(TEXT, 7, "budgets"), "the val row!"]
    others = {"validation": ["The val row", "nothing alike at all here"], "test": [TEXT]}
    leaks = find_leakage(train, others)
    got = [(leak.train_index, leak.split, leak.other_index, leak.kind) for leak in leaks]
    assert got == [(2, "test", 0, "near"), (3, "validation", 0, "exact")]
    assert leaks[1].similarity == 1.0 and 0.85 <= leaks[0].similarity < 1.0
    assert [leak.kind for leak in find_leakage(train, others, near=False)] == ["exact"]
    assert find_leakage(train, {}) == []


@pytest.mark.skipif(not SMS.exists(), reason="examples/data/sms_spam not present")
def test_sms_spam_duplicate_counts():
    _, texts = read_sms()
    assert len(texts) == 5574
    result = find_duplicates(texts)
    assert result.removed_exact == 436  # same text after normalize()
    assert 60 <= result.removed_near <= 90  # 73 with the defaults; MinHash estimates vary by seed
    assert len(result.keep) == 5574 - result.removed_exact - result.removed_near


def test_rows_whose_targets_differ_are_never_merged():
    """40 'convert X degrees Celsius' rows with 40 different answers are 40 examples (30 were lost once)."""
    texts = [f"Convert {c} degrees Celsius to Fahrenheit. {c * 9 / 5 + 32:g} degrees Fahrenheit" for c in range(10, 50)]
    answers = [f"{c * 9 / 5 + 32:g} degrees Fahrenheit" for c in range(10, 50)]
    assert len(find_duplicates(texts, threshold=0.7).keep) < 40  # by text alone they look like near duplicates
    result = find_duplicates(texts, threshold=0.7, targets=answers)
    assert result.keep == list(range(40)) and result.removed_near == 0
    # equal targets are still merged, exact and near
    texts2 = [TEXT, TEXT, one_word_changed(TEXT, 5, "friday"), OTHER]
    result = find_duplicates(texts2, threshold=0.8, targets=["a", "a", "a", "b"])
    assert result.keep == [0, 3] and result.removed_exact == 1 and result.removed_near == 1
    # the same text with two labels: a conflict, kept twice rather than one label silently dropped
    assert find_duplicates([TEXT, TEXT], targets=["pos", "neg"]).keep == [0, 1]
