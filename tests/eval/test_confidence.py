"""Paired intervals: agreement with scipy on fixed data, and the verdicts on the issue's cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from qatune.eval import confidence


def test_exact_binomial_agrees_with_scipy():
    for successes, trials in ((9, 23), (0, 5), (5, 5), (3, 40), (120, 200), (1, 1)):
        expected = stats.binomtest(successes, trials, 0.5).pvalue
        assert confidence.sign_test_p(successes, trials) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        ci = stats.binomtest(successes, trials).proportion_ci(0.95, method="exact")
        assert confidence.clopper_pearson(successes, trials, 0.95) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert confidence.binomial_cdf(successes, trials, 0.3) == pytest.approx(stats.binom.cdf(successes, trials, 0.3))


def test_two_and_a_half_points_on_200_questions_with_14_9_flips_is_noise():
    interval = confidence.mcnemar(right_to_wrong=14, wrong_to_right=9, items=200)
    assert interval.delta == pytest.approx(-2.5)
    assert interval.p_value == pytest.approx(stats.binomtest(9, 23, 0.5).pvalue)  # 0.405
    assert interval.low < 0 < interval.high and not interval.significant
    assert "no significant change" in interval.describe()


def test_twenty_points_on_200_questions_is_significant():
    interval = confidence.mcnemar(right_to_wrong=45, wrong_to_right=5, items=200)
    assert interval.delta == pytest.approx(-20.0)
    assert interval.significant and interval.high < 0 and interval.p_value < 1e-6
    assert "significant)" in interval.describe()
    assert not confidence.mcnemar(0, 0, 50).significant  # no flip, no change


def test_mcnemar_interval_and_test_agree_at_the_boundary():
    # The interval excludes zero exactly when the exact test rejects at 1 - level.
    for b in range(0, 20):
        for c in range(0, 20):
            interval = confidence.mcnemar(b, c, 100)
            assert interval.significant == (interval.p_value < 0.05), (b, c)


def test_paired_bootstrap_agrees_with_scipy_on_fixed_data():
    rng = random.Random(3)
    base = [rng.uniform(0, 40) for _ in range(120)]
    tuned = [b + rng.gauss(2.0, 8.0) for b in base]
    ours = confidence.paired_bootstrap(base, tuned, level=0.95, resamples=20000, seed=1)
    reference = stats.bootstrap((np.array(tuned), np.array(base)), lambda t, b: np.mean(t - b), paired=True,
                                vectorized=False, n_resamples=20000, method="percentile", confidence_level=0.95,
                                random_state=np.random.default_rng(7)).confidence_interval
    assert ours.delta == pytest.approx(np.mean(np.array(tuned) - np.array(base)))
    assert ours.low == pytest.approx(reference.low, abs=0.15) and ours.high == pytest.approx(reference.high, abs=0.15)
    assert ours == confidence.paired_bootstrap(base, tuned, level=0.95, resamples=20000, seed=1)  # seeded


def test_paired_bootstrap_verdicts():
    base = [float(i % 7) for i in range(80)]
    assert not confidence.paired_bootstrap(base, list(base)).significant
    assert confidence.paired_bootstrap(base, [b + 1.0 + (i % 3) for i, b in enumerate(base)]).significant
    with pytest.raises(ValueError):
        confidence.paired_bootstrap([1.0], [1.0, 2.0])


def test_perplexity_interval_is_the_corpus_perplexity_difference():
    rng = random.Random(0)
    base = [(rng.uniform(2.0, 3.0), rng.randint(5, 40)) for _ in range(60)]
    tuned = [(loss - 0.3, n) for loss, n in base]
    interval = confidence.paired_bootstrap_perplexity(base, tuned, resamples=500)

    def ppl(pairs):
        return math.exp(sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs))

    assert interval.delta == pytest.approx(ppl(tuned) - ppl(base))
    assert interval.significant and interval.high < 0
