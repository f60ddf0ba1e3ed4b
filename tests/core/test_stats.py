"""mrpo.stats against scipy and against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from mrpo.core.stats import (
    bootstrap_means,
    bootstrap_p_value,
    bootstrap_summary,
    holm_adjusted,
    paired_t_p_value,
    percentile_interval,
    t_interval,
)


def test_t_interval_is_scipys_and_hand_computed():
    x = [0.61, 0.58, 0.66, 0.60, 0.63]
    mean, low, high = t_interval(x, 0.95)
    lo, hi = sp.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sp.sem(x))
    assert mean == pytest.approx(0.616) and (low, high) == pytest.approx((lo, hi), abs=1e-12)
    # by hand: squared deviations sum to 0.00372, so sd = sqrt(0.00093); t(0.975, 4) = 2.776445
    assert high - mean == pytest.approx(2.7764451 * math.sqrt(0.00093) / math.sqrt(5), rel=1e-6)
    assert math.isnan(t_interval([0.5])[1]) and t_interval([0.5])[0] == 0.5
    assert math.isnan(t_interval([])[0])


def test_paired_t_p_value_is_scipys_ttest_rel():
    a, b = [0.61, 0.58, 0.66, 0.60, 0.63], [0.55, 0.57, 0.60, 0.61, 0.58]
    assert paired_t_p_value(a, b) == pytest.approx(sp.ttest_rel(a, b).pvalue, abs=1e-12)
    assert paired_t_p_value([1, 2, 3], [0, 1, 2]) == 0.0  # always exactly 1 better
    assert paired_t_p_value([1, 2], [1, 2]) == 1.0
    assert math.isnan(paired_t_p_value([1], [0]))


def test_one_seed_bootstrap_has_the_binomial_spread_and_scipys_interval():
    rng = np.random.default_rng(0)
    correct = (rng.random(400) < 0.7).astype(float)[None, :]  # one seed, 400 pairs
    samples = bootstrap_means(correct, 20000, np.random.default_rng(1))
    p = correct.mean()
    assert samples.std() == pytest.approx(math.sqrt(p * (1 - p) / 400), rel=0.03)
    ours = percentile_interval(samples, 0.95)
    ref = sp.bootstrap(
        (correct[0],), np.mean, n_resamples=20000, method="percentile", random_state=2
    ).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.006)


def test_two_level_bootstrap_resamples_seeds():
    # two seeds, every pair alike within a seed: only the seed draw matters, so a resample's mean is
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    scores = np.array([[0.0] * 50, [1.0] * 50])
    samples = bootstrap_means(scores, 40000, np.random.default_rng(0))
    values, counts = np.unique(samples, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert (counts / counts.sum()) == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    with pytest.raises(ValueError, match="seeds, pairs"):
        bootstrap_means(np.zeros((0, 3)), 10, np.random.default_rng(0))


def test_p_value_and_summary_of_a_sure_difference_and_of_none():
    b = 999
    assert bootstrap_p_value(np.ones(b)) == pytest.approx(2 / (b + 1))
    assert bootstrap_p_value(np.array([-1.0, 1.0] * 500)) == 1.0
    sure = bootstrap_summary(np.ones((5, 30)), resamples=b)
    assert sure == {"mean": 1.0, "low": 1.0, "high": 1.0, "p": pytest.approx(2 / (b + 1))}
    none = bootstrap_summary(np.tile([1.0, -1.0], (5, 50)), resamples=2000)
    assert none["mean"] == 0 and none["low"] < 0 < none["high"] and none["p"] > 0.5


def test_holm_adjustment_matches_a_hand_computed_example():
    """m = 4 finite p-values, sorted 0.01 < 0.02 < 0.03 < 0.04: 4 x 0.01 = 0.04; 3 x 0.02 = 0.06;
    2 x 0.03 = 0.06 (max with 0.06); 1 x 0.04 = 0.04, raised to the running max 0.06. A NaN stays NaN and does
    not count in m; 4 x 0.3 caps at 1."""
    adjusted = holm_adjusted([0.03, float("nan"), 0.01, 0.04, 0.02])
    assert adjusted[0] == pytest.approx(0.06)
    assert math.isnan(adjusted[1])
    assert adjusted[2:] == pytest.approx([0.04, 0.06, 0.06])
    assert holm_adjusted([0.3, 0.5]) == pytest.approx([0.6, 0.6])
    assert holm_adjusted([0.3, 0.3, 0.3, 0.3]) == pytest.approx([1.0] * 4)
    assert holm_adjusted([]) == []
