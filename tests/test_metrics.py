"""Metric code against hand-computed values and against scikit-learn / sacrebleu / rouge-score calls."""

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from tunesmith.evaluation import metrics

Y_TRUE = ["a", "a", "b", "b", "c"]
Y_PRED = ["a", "b", "b", "b", "a"]


def test_classification_by_hand():
    m = metrics.classification(Y_TRUE, Y_PRED, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == {"labels": ["a", "b", "c"], "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 0]]}


def test_a_class_absent_from_the_test_set_and_the_answers_is_not_averaged_as_zero():
    """TREC's first 96 test questions hold no abbreviation: macro F1 over the 5 classes there, not 6."""
    m = metrics.classification(["a", "a", "b"], ["a", "b", "b"], ["a", "b", "never"])
    f1_a, f1_b = 2 / 3, 2 / 3
    assert m["f1"] == pytest.approx((f1_a + f1_b) / 2) and m["per_class"]["never"]["support"] == 0
    assert metrics.classification_stats(["a", "a", "b"], ["a", "b", "b"], ["a", "b", "never"])["f1"](
        np.arange(3)) == pytest.approx(m["f1"])
    # a class answered but absent from the references counts (its precision is 0)
    m = metrics.classification(["a", "a"], ["a", "never"], ["a", "never"])
    assert m["f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_resampled_macro_f1_equals_sklearn_on_every_resample():
    rng = np.random.default_rng(3)
    labels = ["x", "y", "z"]
    t = list(rng.choice(labels, 60))
    p = [y if rng.random() < 0.6 else str(rng.choice(labels + ["junk"])) for y in t]  # some invalid answers
    stats = metrics.classification_stats(t, p, labels)
    for idx in metrics.resample_indices(60, 20, seed=1):
        ti, pi = [t[i] for i in idx], [p[i] for i in idx]
        present = [lab for lab in labels if lab in set(ti) | set(pi)]
        ref = f1_score(ti, pi, labels=present, average="macro", zero_division=0)
        assert stats["f1"](idx) == pytest.approx(ref)
        assert stats["accuracy"](idx) == pytest.approx(np.mean([t[i] == p[i] for i in idx]))


def test_generation_metrics_against_references():
    refs = ["the cat sat on the mat", "a quick brown fox", "Positive."]
    preds = ["the cat sat", "a quick brown dog", "positive"]
    values, stats = metrics.generation(refs, preds)
    assert values["exact_match"] == pytest.approx(1 / 3)  # case and final period ignored
    assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert values[key] == pytest.approx(np.mean([scorer.score(r, p)[key].fmeasure for r, p in zip(refs, preds)]))
    # by hand: "the cat sat" vs "the cat sat on the mat": unigram P 3/3, R 3/6 -> F 2/3
    assert metrics.rouge(refs[:1], preds[:1])["rouge1"][0] == pytest.approx(2 / 3)
    assert metrics.bleu(["the same five words here"], ["the same five words here"]) == pytest.approx(100.0)
    assert set(stats) == set(values)


def test_interval_of_a_coin_matches_the_normal_approximation():
    scores = np.array([1.0, 0.0] * 200)
    low, high = metrics.interval(lambda idx: float(scores[idx].mean()), 400, resamples=2000)
    half = 1.96 * np.sqrt(0.25 / 400)  # 0.049
    assert low == pytest.approx(0.5 - half, abs=0.012) and high == pytest.approx(0.5 + half, abs=0.012)
    assert metrics.interval(lambda idx: 0.7, 10) == (0.7, 0.7)


def test_paired_p_value():
    n = 200
    a = np.ones(n)
    same = metrics.paired_p_value(lambda i: float(a[i].mean()), lambda i: float(a[i].mean()), n)
    assert same == 1.0  # no difference at all
    b = a.copy()
    b[:40] = 0  # A right on 40 more examples of 200
    clear = metrics.paired_p_value(lambda i: float(a[i].mean()), lambda i: float(b[i].mean()), n)
    assert clear < 0.01
    c = a.copy()
    c[:2] = 0  # two examples of difference: not significant
    c2 = a.copy()
    c2[2:3] = 0
    noisy = metrics.paired_p_value(lambda i: float(c2[i].mean()), lambda i: float(c[i].mean()), n)
    assert noisy > 0.2


def test_a_p_value_at_the_bootstrap_floor_is_printed_as_a_bound():
    """With 200 resamples no resample as extreme gives p = 1/201: the true p may be far smaller, so
    it reads "p<=0.005", never as an exact "p=0.005" (a newcomer's finding); 1000 resamples: "<0.001"."""
    n = 200
    a, b = np.ones(n), np.ones(n)
    b[:40] = 0
    p = metrics.paired_p_value(lambda i: float(a[i].mean()), lambda i: float(b[i].mean()), n, resamples=200)
    assert p == pytest.approx(1 / 201)
    assert metrics.p_is(p, 1 / 201) == "p<=0.005" and metrics.p_is(p) == "p=0.005"
    assert metrics.p_is(0.0123, 1 / 201) == "p=0.012" and metrics.p_text(1 / 1001, 1 / 1001) == "<0.001"


def test_several_references_follow_each_metric_s_own_rule():
    refs = [["the cat sat on the mat", "a cat was sitting on the mat"], ["hello there"], ["good night", "sleep well", "bye"]]
    preds = ["a cat was sitting on the mat", "hello", "sleep well"]
    values, stats = metrics.generation(refs, preds)
    # exact match: any reference
    assert values["exact_match"] == pytest.approx(2 / 3)
    # ROUGE: rouge-score's score_multi, the best reference per example
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rougeL"):
        expected = np.mean([max(scorer.score(r, p)[key].fmeasure for r in rs) for rs, p in zip(refs, preds)])
        assert values[key] == pytest.approx(expected)
    assert values["rougeL"] > metrics.generation([r[0] for r in refs], preds)[0]["rougeL"]
    # BLEU and chrF: sacrebleu's multi-reference streams (None where an example has fewer references)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(3)]
    assert values["bleu"] == pytest.approx(sacrebleu.BLEU().corpus_score(preds, streams).score)
    assert values["chrf"] == pytest.approx(sacrebleu.CHRF().corpus_score(preds, streams).score)
    assert values["chrf"] > metrics.chrf([r[0] for r in refs], preds)
    assert stats["bleu"](np.arange(3)) == pytest.approx(values["bleu"])


def test_perplexity_pools_tokens_and_resamples():
    nll, counts = [2.0, 6.0, 1.0], [1, 3, 1]
    values, stats = metrics.language_model(nll, counts)
    assert values["loss"] == pytest.approx(9.0 / 5) and values["perplexity"] == pytest.approx(np.exp(9.0 / 5))
    assert stats["perplexity"](np.array([0, 0, 2])) == pytest.approx(np.exp(5.0 / 3))
    assert metrics.headline("text") == "perplexity" and metrics.headline("chat") == "rougeL"
    assert metrics.headline("classification", "f1") == "f1"
    assert metrics.better("perplexity", 3.0, 4.0) and metrics.better("accuracy", 0.9, 0.8)


def test_huge_values_in_the_metrics_table_read_in_e_notation():
    """A base model's perplexity on labels it never saw (~1e8) printed as 457576677.8258 [384310554.3440, ...]
    and its change as -457576506.3383: noise to read (a newcomer's finding). Ordinary values keep four decimals."""
    from tunesmith.report.html import metrics_table

    ev = {"base": {"perplexity": 457576677.8, "accuracy": 0.825, "ci": {"perplexity": [384310554.3, 540000000.0]}},
          "tuned": {"perplexity": 171.2, "accuracy": 0.9, "ci": {"accuracy": [0.8, 0.97]}}}
    rows = {r[0]: r for r in metrics_table(ev)}
    assert rows["perplexity"][1:] == ("4.576e+08 [3.843e+08, 5.400e+08]", "171.2000", "-4.576e+08")
    assert rows["accuracy"][1:] == ("0.8250", "0.9000 [0.8000, 0.9700]", "+0.0750")


def test_bleu_and_chrf_say_their_0_to_100_scale_where_they_sit_beside_0_to_1_scores():
    """A newcomer read chrF 0.196 (of 100, for garbage answers) as a real gain next to ROUGE's 0-1."""
    from tunesmith.report.html import metrics_table

    ev = {"base": {"rougeL": 0.1, "bleu": 0.0, "chrf": 0.03}, "tuned": {"rougeL": 0.2, "bleu": 1.5, "chrf": 0.2}}
    labels = [row[0] for row in metrics_table(ev)]
    assert labels == ["rougeL", "bleu (0-100)", "chrf (0-100)"]
