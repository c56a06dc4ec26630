"""edgesmith.stats: the bootstrap of a median and the round-paired speedup (the benchmarks' method)."""

from __future__ import annotations

import numpy as np
import pytest

from edgesmith.errors import BadInput
from edgesmith.profiling.speculative import paired_interval
from edgesmith.stats import bootstrap_speedup, median_ci, paired_speedup


def test_median_ci_brackets_the_median_and_is_reproducible():
    rng = np.random.default_rng(3)
    values = rng.normal(10.0, 1.0, size=41)
    point, low, high = median_ci(values, seed=1)
    assert point == pytest.approx(float(np.median(values)))
    assert low <= point <= high
    assert median_ci(values, seed=1) == (point, low, high)
    # a wider confidence gives an interval at least as wide
    _, low99, high99 = median_ci(values, seed=1, confidence=0.99)
    assert low99 <= low and high99 >= high


def test_median_ci_of_constant_values_is_a_point():
    assert median_ci([2.0] * 7) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_median_ci_refuses_empty_or_non_finite(bad):
    with pytest.raises(BadInput):
        median_ci(bad)


def test_paired_speedup_cancels_round_drift():
    """A machine that slows down round after round slows both sides of each round's ratio: the paired
    interval stays tight around the true 2x, where pooling the samples would smear it."""
    drift = np.linspace(1.0, 3.0, 12)
    base = [[10.0 * d, 10.2 * d, 9.9 * d] for d in drift]
    cand = [[5.0 * d, 5.1 * d, 4.95 * d] for d in drift]
    point, low, high = paired_speedup(base, cand)
    assert point == pytest.approx(2.0, rel=1e-3)
    assert high - low < 0.01
    _, plow, phigh = bootstrap_speedup([x for b in base for x in b], [x for c in cand for x in c])
    assert phigh - plow > 10 * (high - low)


def test_paired_speedup_direction_and_checks():
    base = [[4.0, 4.1]] * 5
    cand = [[8.0, 8.2]] * 5
    point, low, high = paired_speedup(base, cand)
    assert point == pytest.approx(0.5) and high < 1.0
    with pytest.raises(BadInput, match="same, non-zero number of rounds"):
        paired_speedup(base, cand[:4])
    with pytest.raises(BadInput, match="at least one latency"):
        paired_speedup([[1.0], []], [[1.0], [1.0]])
    with pytest.raises(BadInput, match="positive"):
        paired_speedup([[0.0]], [[1.0]])


def test_speculative_paired_interval_is_median_ci():
    ratios = [1.1, 1.3, 0.9, 1.2, 1.25, 1.05]
    assert paired_interval(ratios) == list(median_ci(ratios))
    with pytest.raises(BadInput):
        paired_interval([])
