"""The statistics of `mrpo compare`: intervals over seeds, a two-level bootstrap, paired tests. Pure
numpy/scipy.

Held-out reward accuracy is a (seeds x test pairs) matrix of 0/1 per configuration: every seed trains on its
own draw of training pairs and is scored on the same test pairs. Its uncertainty has two sources, the
training run (seed) and the finite test set, so the bootstrap resamples both: seeds with replacement, then
test pairs with replacement, the same pairs for every seed of a resample. A paired difference is the same
bootstrap applied to the per-pair difference of two configurations' matrices (same seeds, same pairs), so
what the two share (the training draw of a seed, the difficulty of a pair) cancels.

Scores with one value per run (lm-eval task scores) get a Student t interval over seeds and a paired t-test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval of the mean over runs; low/high NaN for fewer than 2."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_t_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that mean(a - b) = 0; NaN for fewer than 2 pairs."""
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd == 0:  # every run differs by the same amount: certain unless that amount is 0
        return 1.0 if d.mean() == 0 else 0.0
    t = d.mean() / (sd / math.sqrt(d.size))
    return float(2 * stats.t.sf(abs(t), d.size - 1))


def bootstrap_means(scores: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B,) means of `scores` (seeds x pairs) over two-level resamples: seeds, then pairs, with replacement.

    One resample draws S seeds and N pair indices; its value is the mean over the drawn seeds of each
    seed's mean over the drawn pairs. Done with multinomial counts, so it is (B x N) @ (N x S) work.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores: expected a non-empty (seeds, pairs) matrix, got shape {scores.shape}")
    s, n = scores.shape
    pair_counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)  # (B, N)
    per_seed = pair_counts @ scores.T / n  # (B, S): each seed's mean over the resampled pairs
    seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=resamples)  # (B, S)
    return (per_seed * seed_counts).sum(axis=1) / s


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap samples (percentile method)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value that the mean is 0: twice the smaller share of samples on either side of 0,
    each counted as (k + 1) / (B + 1) so it is never 0 from a finite number of resamples."""
    b = len(samples)
    below = (np.count_nonzero(samples <= 0) + 1) / (b + 1)
    above = (np.count_nonzero(samples >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(below, above)))


def bootstrap_summary(
    scores: np.ndarray, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """mean, low, high (two-level bootstrap interval) and p (that the mean is 0) of a (seeds x pairs)
    matrix."""
    samples = bootstrap_means(scores, resamples, np.random.default_rng(seed))
    low, high = percentile_interval(samples, confidence)
    return {"mean": float(np.mean(scores)), "low": low, "high": high, "p": bootstrap_p_value(samples)}


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values, in their given order.

    Sorted ascending, the i-th smallest (1-based) becomes max over j <= i of min(1, (m - j + 1) p_(j)), with m
    the number of tests: rejecting where the adjusted p <= alpha controls the family-wise error rate at alpha
    under any dependence. NaN p-values (a test that could not be run) stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, math.nan)
    m = finite.size
    running = 0.0
    for rank, index in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
