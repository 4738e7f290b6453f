"""Paired confidence intervals for base-against-tuned deltas.

Both models answer the same items, so every interval is paired (it uses the per-item
differences, which are far less noisy than two separate intervals):

- generation metrics and per-answer rates: percentile bootstrap of the mean difference, resampling
  items (seeded: the same seed gives the same interval);
- perplexity: the same resampled items, each side's corpus perplexity recomputed from their
  (loss, token count) pairs;
- multiple-choice accuracy: the exact McNemar test on the right->wrong (b) and wrong->right (c)
  flips (a two-sided exact binomial test of c among b + c at 1/2), and the delta's interval from the
  Clopper-Pearson interval of c / (b + c): delta = (c - b) / n = (b + c) / n * (2p - 1). The
  interval holds zero exactly when the test does not reject, so the two never disagree.

A delta is a "no significant change" when its interval holds zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

NOT_SIGNIFICANT = "no significant change"


@dataclass(frozen=True)
class Interval:
    """A delta (tuned - base) with its paired confidence interval."""

    delta: float
    low: float
    high: float
    level: float  # 0.95 for a 95% interval
    method: str  # "bootstrap" or "mcnemar"
    items: int
    p_value: float | None = None  # McNemar's exact p; the bootstrap gives none

    @property
    def significant(self) -> bool:
        return not self.low <= 0 <= self.high

    def describe(self, digits: int = 2) -> str:
        """`+1.23 (95% CI -0.40 to +2.90, no significant change)`."""
        verdict = "significant" if self.significant else NOT_SIGNIFICANT
        return (f"{self.delta:+.{digits}f} ({self.level * 100:g}% CI {self.low:+.{digits}f} to "
                f"{self.high:+.{digits}f}, {verdict})")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def _resampled_indices(items: int, resamples: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, items, size=(resamples, items))


def _percentile_interval(delta: float, replicates: Any, level: float, method: str, items: int) -> Interval:
    import numpy as np

    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(delta), float(low), float(high), level, method, items)


def paired_bootstrap(base: list[float], tuned: list[float], level: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> Interval:
    """Percentile bootstrap interval of mean(tuned) - mean(base) over paired items."""
    import numpy as np

    if len(base) != len(tuned) or not base:
        raise ValueError(f"paired_bootstrap needs two equal, non-empty lists (got {len(base)} and {len(tuned)})")
    diffs = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    means = diffs[_resampled_indices(len(diffs), resamples, seed)].mean(axis=1)
    return _percentile_interval(diffs.mean(), means, level, "bootstrap", len(diffs))


def paired_bootstrap_perplexity(base: list[tuple[float, int]], tuned: list[tuple[float, int]], level: float = 0.95,
                                resamples: int = 2000, seed: int = 0) -> Interval:
    """Interval of perplexity(tuned) - perplexity(base), each the exp of the token-weighted mean loss of
    the resampled items' (mean loss, token count) pairs."""
    import numpy as np

    if len(base) != len(tuned) or not base:
        raise ValueError(f"paired_bootstrap_perplexity needs two equal, non-empty lists (got {len(base)} and "
                         f"{len(tuned)})")
    index = _resampled_indices(len(base), resamples, seed)

    def perplexities(pairs: list[tuple[float, int]]) -> tuple[float, Any]:
        losses, counts = (np.asarray(column, dtype=float) for column in zip(*pairs))
        totals = losses * counts
        whole = math.exp(totals.sum() / counts.sum())
        return whole, np.exp(totals[index].sum(axis=1) / counts[index].sum(axis=1))

    (whole_base, base_reps), (whole_tuned, tuned_reps) = perplexities(base), perplexities(tuned)
    return _percentile_interval(whole_tuned - whole_base, tuned_reps - base_reps, level, "bootstrap", len(base))


# --- exact binomial (for McNemar), without scipy at run time; tests check it against scipy.stats


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.fsum(math.exp(_log_pmf(i, n, p)) for i in range(k + 1)))


def sign_test_p(successes: int, trials: int) -> float:
    """Two-sided exact binomial p-value of `successes` in `trials` at p = 1/2 (twice the smaller tail)."""
    if trials == 0:
        return 1.0
    smaller = min(successes, trials - successes)
    return min(1.0, 2 * binomial_cdf(smaller, trials, 0.5))


def _bisect(increasing: Callable[[float], float], target: float) -> float:
    """The p in [0, 1] where the increasing function `increasing(p)` crosses `target`."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if increasing(middle) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion."""
    alpha = 1 - level
    if trials == 0:
        return 0.0, 1.0
    # low: P(X >= k | p) = alpha/2, i.e. 1 - cdf(k-1, p) rises with p; high: cdf(k, p) = alpha/2, falling with p.
    low = 0.0 if successes == 0 else _bisect(lambda p: 1 - binomial_cdf(successes - 1, trials, p), alpha / 2)
    high = 1.0 if successes == trials else _bisect(lambda p: -binomial_cdf(successes, trials, p), -alpha / 2)
    return low, high


def mcnemar(right_to_wrong: int, wrong_to_right: int, items: int, level: float = 0.95) -> Interval:
    """Accuracy delta (tuned - base, in points of 100) with McNemar's exact test and its matching interval."""
    flips = right_to_wrong + wrong_to_right
    if items <= 0 or flips > items:
        raise ValueError(f"mcnemar: {flips} flips among {items} items")
    low, high = clopper_pearson(wrong_to_right, flips, level)
    share = flips / items * 100
    delta = (wrong_to_right - right_to_wrong) / items * 100
    return Interval(delta, share * (2 * low - 1), share * (2 * high - 1), level, "mcnemar", items,
                    sign_test_p(wrong_to_right, flips))
