"""How sure a chapter can be: 95% intervals for accuracies, means over seeds and paired differences, and
the one-line ``takeaway`` that prints the boolean behind a sentence of prose.

Every interval comes from ``scipy.stats``: Wilson for a proportion (k right of n), Student's t for a
mean over a few seeds, and the bootstrap (BCa, fixed seed) for a mean over items, a paired difference
between two methods scored on the same items, or a corpus statistic such as BLEU that is not a mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval [low, high] over n items (or seeds)."""

    estimate: float
    low: float
    high: float
    n: int
    method: str

    def __str__(self) -> str:
        return f"{self.estimate:.3f} (95% CI {self.low:.3f} to {self.high:.3f}, n={self.n})"

    def above(self, other: Interval | float) -> bool:
        """True when the whole interval lies above ``other`` (a value, or another interval's top)."""
        return self.low > (other.high if isinstance(other, Interval) else other)

    def below(self, other: Interval | float) -> bool:
        """True when the whole interval lies below ``other`` (a value, or another interval's bottom)."""
        return self.high < (other.low if isinstance(other, Interval) else other)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _check_n(n: int) -> None:
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"an interval needs at least one item, got n={n!r}")


def wilson(successes: int, n: int) -> Interval:
    """The Wilson score interval for ``successes`` right out of ``n`` (an accuracy, an exact match)."""
    _check_n(n)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), int(n), "wilson")


def accuracy(correct: Sequence[bool]) -> Interval:
    """Wilson interval of the share of True in ``correct``."""
    return wilson(int(sum(bool(c) for c in correct)), len(correct))


def seeds_interval(values: Sequence[float]) -> Interval:
    """Mean over seeds (or runs) with Student's t interval; one value gives an unbounded interval."""
    _check_n(len(values))
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, -math.inf, math.inf, 1, "t")
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x), "t")


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable[..., float], seed: int) -> tuple[float, float]:
    if all(np.all(d == d[0]) for d in data):  # no spread: the bootstrap would warn and return NaN
        value = float(statistic(*data))
        return value, value
    for method in ("BCa", "percentile"):  # BCa degenerates on tiny samples: then the percentile interval
        result = stats.bootstrap(
            data,
            statistic,
            n_resamples=RESAMPLES,
            confidence_level=CONFIDENCE,
            method=method,
            paired=len(data) > 1,
            vectorized=False,
            rng=np.random.default_rng(seed),
        )
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            break
    return float(low), float(high)


def mean_interval(values: Sequence[float], seed: int = 0) -> Interval:
    """Mean over items (per-item scores, losses) with a bootstrap interval over the items."""
    _check_n(len(values))
    x = np.asarray(values, dtype=float)
    low, high = _bootstrap((x,), lambda a: float(np.mean(a)), seed)
    return Interval(float(x.mean()), low, high, len(x), "bootstrap")


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Interval:
    """Mean of ``a - b`` over the same items scored two ways, with a paired bootstrap interval: the
    difference is decided when the interval excludes 0."""
    if len(a) != len(b):
        raise ValueError(f"a paired difference needs the same items on both sides, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return mean_interval(diff.tolist(), seed)


def corpus_interval(items: Sequence[object], statistic: Callable[[list], float], seed: int = 0) -> Interval:
    """A statistic of a whole corpus (BLEU, chrF, perplexity) with a bootstrap interval over its items:
    ``statistic`` takes a list of items (e.g. (hypothesis, reference) pairs) and returns one number."""
    _check_n(len(items))
    index = np.arange(len(items))

    def on(idx: np.ndarray) -> float:
        return float(statistic([items[int(i)] for i in idx]))

    low, high = _bootstrap((index,), on, seed)
    return Interval(on(index), low, high, len(items), "bootstrap")


def takeaway(name: str, holds: bool) -> bool:
    """Print the boolean behind a sentence of a chapter's prose as ``takeaway: name = True``; the tests
    read these lines (nbval where the claim holds in every profile, the full-profile test for the rest)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"a takeaway name is letters, digits and underscores, got {name!r}")
    holds = bool(holds)
    print(f"takeaway: {name} = {holds}")
    return holds
