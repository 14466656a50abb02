"""The learning-curve fit: a known saturating power law is recovered, with honest intervals."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.evaluation import learning_curve as lc


def _points(sizes, fn, width=0.01):
    return [{"train_examples": n, "value": fn(n), "low": fn(n) - width / 2, "high": fn(n) + width / 2} for n in sizes]


def test_a_known_power_law_is_recovered_and_doubling_predicted():
    truth = lambda n: 0.9 - 2.0 * n ** -0.5  # noqa: E731
    f = lc.fit(_points([64, 128, 256, 512, 1024], truth, width=0.002))
    assert f["ceiling"] == pytest.approx(0.9, abs=0.01) and f["b"] == pytest.approx(0.5, abs=0.05)
    assert f["gain"] == pytest.approx(truth(2048) - truth(1024), rel=0.1)
    assert f["gain_low"] <= truth(2048) - truth(1024) <= f["gain_high"]
    assert f["ceiling_low"] <= 0.9 <= f["ceiling_high"]
    words = lc.in_words(f, "accuracy", "lora")
    assert "doubling the training data (1,024 -> 2,048 examples)" in words and "an extrapolation" in words


def test_loss_curves_fall_toward_a_floor():
    truth = lambda n: 1.5 + 4.0 * n ** -0.4  # noqa: E731
    f = lc.fit(_points([100, 300, 1000, 3000], truth, width=0.004), lower_is_better=True)
    assert f["ceiling"] == pytest.approx(1.5, abs=0.05) and f["gain"] < 0  # more data: lower loss
    np.testing.assert_allclose(lc.curve(f, np.array([100.0, 3000.0])), [truth(100), truth(3000)], rtol=0.01)


def test_wide_intervals_give_wide_predictions_and_say_so():
    flat = lambda n: 0.8  # noqa: E731  # no trend at all: more data buys nothing we can see
    f = lc.fit(_points([64, 256, 1024], flat, width=0.1))
    assert f["gain_low"] < 0 < f["gain_high"] or abs(f["gain"]) < 0.01
    assert "interval" in lc.in_words(f, "accuracy", "full")


def test_fewer_than_three_sizes_are_not_fitted():
    assert lc.fit(_points([64, 1024], lambda n: 0.5)) is None
    assert "needs at least 3 training-set sizes" in lc.in_words(None, "accuracy", "lora")
