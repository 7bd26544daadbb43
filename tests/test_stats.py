"""The intervals the chapters print, against hand-computed values and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cyclelab.lab import stats


def test_wilson_matches_the_formula_by_hand():
    k, n, z = 7, 20, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    got = stats.wilson(k, n)
    assert got.estimate == pytest.approx(0.35)
    assert (got.low, got.high) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_wilson_stays_inside_zero_and_one_at_the_edges():
    assert stats.wilson(0, 10).low == pytest.approx(0.0, abs=1e-12)
    assert stats.wilson(10, 10).high == pytest.approx(1.0, abs=1e-12)
    assert stats.accuracy([True, False, True, True]).estimate == 0.75


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (0, 0)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError):
        stats.wilson(k, n)


def test_seeds_interval_is_students_t_by_hand():
    got = stats.seeds_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert (got.low, got.estimate, got.high) == pytest.approx((2 - half, 2, 2 + half))
    assert math.isinf(stats.seeds_interval([5.0]).high)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = stats.mean_interval(rng.normal(3.0, 1.0, 30).tolist())
    large = stats.mean_interval(rng.normal(3.0, 1.0, 600).tolist())
    assert small.contains(small.estimate) and large.contains(3.0)
    assert large.high - large.low < small.high - small.low
    assert stats.mean_interval([2.0, 2.0, 2.0]).low == 2.0  # no spread: a point


def test_paired_difference_decides_a_consistent_gap_and_not_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, 200)
    better = stats.paired_difference((base + 0.3).tolist(), base.tolist())
    assert better.above(0.0)
    noise = stats.paired_difference(rng.normal(0, 1, 200).tolist(), rng.normal(0, 1, 200).tolist())
    assert noise.contains(0.0)
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [1.0, 2.0])


def test_corpus_interval_resamples_items_not_values():
    pairs = [(i % 3 == 0) for i in range(90)]
    got = stats.corpus_interval(pairs, lambda items: sum(items) / len(items))
    assert got.estimate == pytest.approx(1 / 3)
    assert got.low < 1 / 3 < got.high


def test_interval_comparisons_and_text():
    a, b = stats.Interval(0.8, 0.7, 0.9, 100, "x"), stats.Interval(0.5, 0.4, 0.6, 100, "x")
    assert a.above(b) and b.below(a) and not a.above(0.75)
    assert str(b) == "0.500 (95% CI 0.400 to 0.600, n=100)"


def test_takeaway_prints_the_line_the_tests_read(capsys):
    assert stats.takeaway("lora_beats_chance", np.bool_(True)) is True
    assert capsys.readouterr().out == "takeaway: lora_beats_chance = True\n"
    with pytest.raises(ValueError):
        stats.takeaway("two words", True)
