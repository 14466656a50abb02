"""Weak labeling: loading LF files, the label matrix, LFAnalysis numbers, majority vote, Dawid–Skene."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tunesmith.data.label import (
    ABSTAIN, DawidSkene, LabelingError, LFApplyError, LFFileNotFoundError, LFImportError, LFSyntaxError,
    NoLabelingFunctionsError, apply_lfs, labeling_function, lf_summary, load_labeling_functions,
    majority_vote, weak_label,
)

REPO = Path(__file__).resolve().parents[1]
SMS_LFS = REPO / "examples" / "sms_spam_lfs.py"
SMS_CANDIDATES = [REPO / "examples" / "data" / "sms_spam" / "SMSSpamCollection"]  # shipped with the repo


def write(tmp_path: Path, source: str, name: str = "lfs.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# --- decorator and loading -------------------------------------------------------------------

def test_decorator_keeps_name_and_behaviour():
    @labeling_function()
    def has_x(text: str) -> str | None:
        """Docstring kept."""
        return "x" if "x" in text else ABSTAIN

    @labeling_function("custom")
    def other(text: str) -> str | None:
        return None

    @labeling_function
    def bare(text: str) -> str | None:
        return "y"

    assert (has_x.name, has_x.__name__, has_x.__doc__) == ("has_x", "has_x", "Docstring kept.")
    assert has_x("box") == "x" and has_x("bo") is ABSTAIN
    assert other.name == "custom" and bare.name == "bare" and bare("") == "y"


def test_load_collects_decorated_functions_in_definition_order(tmp_path):
    path = write(tmp_path, """
        from tunesmith.data.label import ABSTAIN, labeling_function

        @labeling_function()
        def zeta(text):
            return "pos" if "good" in text else ABSTAIN

        def helper(text):  # not decorated: not collected
            return "neg"

        @labeling_function("alpha_renamed")
        def alpha(text):
            return "neg" if "bad" in text else ABSTAIN

        also_zeta = zeta  # an alias is the same LF, collected once
    """)
    lfs = load_labeling_functions(path)
    assert [lf.name for lf in lfs] == ["zeta", "alpha_renamed"]
    assert lfs[0]("good film") == "pos"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(LFFileNotFoundError, match="missing.py.*not found"):
        load_labeling_functions(tmp_path / "missing.py")
    bad = write(tmp_path, "x = 1\n\ndef broken(:\n    pass\n", "bad.py")
    with pytest.raises(LFSyntaxError, match=r"bad\.py:3: syntax error"):
        load_labeling_functions(bad)
    empty = write(tmp_path, "def plain(text):\n    return 'a'\n", "empty.py")
    with pytest.raises(NoLabelingFunctionsError, match=r"empty\.py: no labeling functions"):
        load_labeling_functions(empty)
    crash = write(tmp_path, "import os\nraise RuntimeError('boom')\n", "crash.py")
    with pytest.raises(LFImportError, match=r"crash\.py:2: .*RuntimeError: boom"):
        load_labeling_functions(crash)
    dup = write(tmp_path, """
        from tunesmith.data.label import labeling_function
        @labeling_function("same")
        def a(text): return None
        @labeling_function("same")
        def b(text): return None
    """, "dup.py")
    with pytest.raises(LabelingError, match="unique; repeated: same"):
        load_labeling_functions(dup)
    assert issubclass(LFSyntaxError, ValueError) and issubclass(LFFileNotFoundError, ValueError)


# --- the label matrix ------------------------------------------------------------------------

@labeling_function()
def says_pos(text: str) -> str | None:
    return "pos" if "good" in text else ABSTAIN


@labeling_function()
def says_neg(text: str) -> str | None:
    return "neg" if "bad" in text else ABSTAIN


def test_apply_builds_matrix_with_abstains():
    m = apply_lfs([says_pos, says_neg], ["good", "bad", "good and bad", "meh"])
    assert m.labels == ["neg", "pos"]  # sorted union of votes
    assert m.lf_names == ["says_pos", "says_neg"]
    assert m.L.tolist() == [[1, -1], [-1, 0], [1, 0], [-1, -1]]
    assert m.covered.tolist() == [True, True, True, False]
    given = apply_lfs([says_pos], ["good", "x"], labels=["pos", "neg", "neutral"])
    assert given.labels == ["pos", "neg", "neutral"] and given.L[:, 0].tolist() == [0, -1]
    with pytest.raises(LFApplyError, match=r"'says_neg' returned 'neg' on row 1, which is not one of"):
        apply_lfs([says_pos, says_neg], ["good", "bad"], labels=["pos"])


def test_exception_in_lf_is_reported_with_name_and_row():
    @labeling_function()
    def fragile(text: str) -> str | None:
        return "pos" if text.split()[1] == "x" else ABSTAIN

    with pytest.raises(LFApplyError, match=r"'fragile' raised IndexError on row 2") as info:
        apply_lfs([says_pos, fragile], ["a x", "b y", "lonely", "c x"])
    assert (info.value.lf_name, info.value.row) == ("fragile", 2)
    assert isinstance(info.value.__cause__, IndexError)  # the original is chained, not swallowed

    @labeling_function()
    def returns_int(text: str) -> str | None:
        return 1  # type: ignore[return-value]

    with pytest.raises(LFApplyError, match=r"'returns_int' returned 1 \(int\) on row 0"):
        apply_lfs([returns_int], ["a"])


# --- summary, hand-checked -------------------------------------------------------------------

def test_summary_numbers_by_hand():
    L = np.array([[0, 0, -1],
                  [0, 1, -1],
                  [-1, 1, 1],
                  [-1, -1, -1]])
    gold = ["a", "b", None, "a"]
    rows = lf_summary(L, ["lf0", "lf1", "lf2"], gold=gold, labels=["a", "b"])
    by = {r["name"]: r for r in rows}
    # lf0 votes rows 0, 1; both overlap; row 1 conflicts (lf1 says b); gold: row 0 right, row 1 wrong.
    assert by["lf0"] == {"name": "lf0", "polarity": ["a"], "coverage": 0.5, "overlap": 0.5, "conflict": 0.25,
                         "correct": 1, "incorrect": 1, "n_gold": 2, "accuracy": 0.5}
    # lf1 votes rows 0, 1, 2; all overlap; only row 1 conflicts; row 2 has no gold.
    assert by["lf1"] == {"name": "lf1", "polarity": ["a", "b"], "coverage": 0.75, "overlap": 0.75,
                         "conflict": 0.25, "correct": 2, "incorrect": 0, "n_gold": 2, "accuracy": 1.0}
    # lf2 votes row 2 only (agreeing with lf1), which has no gold label.
    assert by["lf2"] == {"name": "lf2", "polarity": ["b"], "coverage": 0.25, "overlap": 0.25, "conflict": 0.0,
                         "correct": 0, "incorrect": 0, "n_gold": 0, "accuracy": None}
    assert set(lf_summary(L, ["lf0", "lf1", "lf2"])[0]) == {"name", "polarity", "coverage", "overlap", "conflict"}


# --- combining votes -------------------------------------------------------------------------

def test_majority_vote_ties_and_uncovered():
    L = np.array([[0, 0, 1], [1, 0, -1], [-1, -1, -1], [2, 2, 1], [-1, 1, -1]])
    assert majority_vote(L, 3).tolist() == [0, 0, -1, 2, 1]  # row 1 is a tie: lowest index
    assert majority_vote(L, 3, ties="abstain").tolist() == [0, -1, -1, 2, 1]
    with pytest.raises(LabelingError, match=r"in \[0, 2\)"):
        majority_vote(L, 2)


def _lf(rng: np.random.Generator, y: np.ndarray, coverage: float, p_vote0: tuple[float, float]) -> np.ndarray:
    """A synthetic binary LF: votes 0 with probability p_vote0[y], abstains with 1 - coverage."""
    vote = np.where(rng.random(len(y)) < np.array(p_vote0)[y], 0, 1)
    return np.where(rng.random(len(y)) < coverage, vote, -1)


def test_dawid_skene_beats_majority_when_biased_lfs_outvote_a_good_one():
    # One good LF (90% right, covers all), two fair ones, and four biased LFs that mostly say 0 whatever
    # the truth (they agree with each other, not with the label). Majority vote follows the crowd;
    # the label model learns from agreement patterns that the crowd carries little information.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    cols = [_lf(rng, y, 1.0, (0.9, 0.1)), _lf(rng, y, 0.5, (0.75, 0.25)), _lf(rng, y, 0.5, (0.75, 0.25))]
    cols += [_lf(rng, y, 0.9, (0.85, 0.65)) for _ in range(4)]
    L = np.stack(cols, axis=1)
    mv_acc = (majority_vote(L, 2) == y).mean()
    ds = DawidSkene(2).fit(L)
    ds_acc = (ds.predict(L) == y).mean()
    assert ds.converged_
    assert ds_acc > 0.88 and ds_acc > mv_acc + 0.15
    est = ds.lf_accuracies()
    assert est[0] > 0.8 and np.all(np.abs(est[3:] - 0.6) < 0.05)  # biased LFs are right 60% of the time
    again = DawidSkene(2).fit(L)
    np.testing.assert_array_equal(again.predict_proba(L), ds.predict_proba(L))  # deterministic


def test_dawid_skene_equals_majority_when_lfs_are_alike():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    L = np.stack([_lf(rng, y, 0.7, (0.75, 0.25)) for _ in range(5)], axis=1)
    counts = np.stack([(L == k).sum(axis=1) for k in (0, 1)], axis=1)
    strict = counts[:, 0] != counts[:, 1]  # rows with a clear majority (ties break differently)
    mv, ds = majority_vote(L, 2), DawidSkene(2).fit(L).predict(L)
    np.testing.assert_array_equal(ds[strict], mv[strict])


def test_dawid_skene_basics():
    L = np.array([[0, 0, 0], [1, 1, -1], [-1, -1, -1], [2, -1, 2], [0, 0, -1], [1, 1, 1]])
    ds = DawidSkene(3).fit(L)
    assert ds.predict(L).tolist() == [0, 1, -1, 2, 0, 1]  # perfect LFs are recovered; uncovered is -1
    proba = ds.predict_proba(L)
    assert proba.shape == (6, 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert ds.confusion_.shape == (3, 3, 4) and np.allclose(ds.confusion_.sum(axis=2), 1.0)
    # Many confident LFs would underflow a product of probabilities; log space keeps it finite.
    many = np.tile(np.array([[0], [1]]), (50, 400))
    p = DawidSkene(2).fit(many).predict_proba(many)
    assert np.all(np.isfinite(p)) and (p.argmax(axis=1) == many[:, 0]).all()
    with pytest.raises(LabelingError, match="not fitted"):
        DawidSkene(2).predict(L)
    with pytest.raises(LabelingError, match="fitted on 3 LFs, got 2"):
        ds.predict(L[:, :2])


def test_weak_label_end_to_end_from_a_file(tmp_path):
    path = write(tmp_path, """
        from tunesmith.data.label import ABSTAIN, labeling_function
        @labeling_function()
        def good(text): return "pos" if "good" in text else ABSTAIN
        @labeling_function()
        def great(text): return "pos" if "great" in text else ABSTAIN
        @labeling_function()
        def bad(text): return "neg" if "bad" in text else ABSTAIN
    """)
    texts = ["good", "great and good", "bad", "bad but good", "nothing", "bad bad"]
    gold = ["pos", "pos", "neg", None, "neg", "neg"]
    res = weak_label(texts, path, gold=gold)
    assert res.labels[:3] == ["pos", "pos", "neg"] and res.labels[4] is None
    assert res.uncovered == 1 and res.proba is not None and res.proba.shape == (6, 2)
    assert [r["name"] for r in res.summary] == ["good", "great", "bad"]
    assert res.gold_eval is not None
    assert (res.gold_eval["n_gold"], res.gold_eval["n_covered"]) == (5, 4)
    assert res.gold_eval["majority_accuracy"] == 1.0
    mv = weak_label(texts, path, model="majority")
    assert mv.model is None and mv.labels[3] == "neg"  # 1 vs 1 tie goes to the lowest index ("neg")
    with pytest.raises(LabelingError, match="model must be"):
        weak_label(texts, path, model="snorkel")  # type: ignore[arg-type]


# --- real data: SMS spam -----------------------------------------------------------------------

def _read_sms(path: Path) -> tuple[list[str], list[str]]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    rows = [line.split("\t", 1) for line in text.splitlines()[1:] if line.strip()]
    return [r[1] for r in rows], [r[0].strip() for r in rows]


@pytest.mark.skipif(not any(p.is_file() for p in SMS_CANDIDATES), reason="examples/data/sms_spam not present")
def test_sms_spam_weak_labels_train_a_good_classifier():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    texts, gold = _read_sms(next(p for p in SMS_CANDIDATES if p.is_file()))
    assert len(texts) == 5574 and set(gold) == {"ham", "spam"}
    lfs = load_labeling_functions(SMS_LFS)
    assert 8 <= len(lfs) <= 12
    full = weak_label(texts, lfs, gold=gold)
    assert full.gold_eval["coverage"] > 0.6
    assert full.gold_eval["dawid_skene_accuracy"] > 0.93

    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    cut = int(0.8 * len(order))
    train, test = [texts[i] for i in order[:cut]], [texts[i] for i in order[cut:]]
    y_test = [gold[i] for i in order[cut:]]
    weak = weak_label(train, lfs)  # the label model sees no gold at all
    keep = [i for i, lab in enumerate(weak.labels) if lab is not None]

    def fit_score(x: list[str], y: list[str]) -> tuple[float, float]:
        vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
        clf = LogisticRegression(max_iter=1000).fit(vec.fit_transform(x), y)
        pred = clf.predict(vec.transform(test))
        return accuracy_score(y_test, pred), f1_score(y_test, pred, pos_label="spam")

    weak_acc, weak_f1 = fit_score([train[i] for i in keep], [weak.labels[i] for i in keep])
    gold_acc, _ = fit_score(train, [gold[i] for i in order[:cut]])
    majority_class = y_test.count("ham") / len(y_test)
    assert weak_acc > 0.94 and weak_acc > majority_class + 0.05
    assert weak_f1 > 0.8
    assert weak_acc > gold_acc - 0.03
