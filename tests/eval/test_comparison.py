"""Paired differences over training seeds and image half-samples (eval.comparison)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.comparison import CellScore, paired_difference, seed_spread, summarize

T_975_2DOF = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), from a table


def _cells(points, shift: float = 0.0, seed: int = 0) -> dict[int, CellScore]:
    """Seed s -> a cell whose 200 resampled values scatter (seeded) around points[s] + shift."""
    rng = np.random.default_rng(seed)
    return {s: CellScore(p, p + shift + rng.normal(0, 1, 200)) for s, p in enumerate(points)}


def test_the_difference_matches_a_hand_computation() -> None:
    recipe, baseline = _cells([10.0, 12.0, 11.0], seed=1), _cells([13.0, 13.5, 12.0], seed=2)
    difference = paired_difference(recipe, baseline)
    per_seed = [-3.0, -1.5, -1.0]
    assert difference.per_seed == pytest.approx(per_seed)
    assert difference.point == pytest.approx(-11 / 6)
    sd = math.sqrt(sum((d + 11 / 6) ** 2 for d in per_seed) / 2)
    assert difference.seed_half_width == pytest.approx(T_975_2DOF * sd / math.sqrt(3))
    # The image term: the basic interval of the seed-mean resampled differences.
    resampled = np.mean([recipe[s].resampled - baseline[s].resampled for s in range(3)], axis=0)
    low, high = np.percentile(resampled, [2.5, 97.5])
    image = (-11 / 6 - (high - resampled.mean()), -11 / 6 - (low - resampled.mean()))
    assert difference.image_interval == pytest.approx(image)
    seed_half = difference.seed_half_width
    assert difference.interval[0] == pytest.approx(
        -11 / 6 - math.hypot(seed_half, -11 / 6 - image[0])
    )
    assert difference.interval[1] == pytest.approx(
        -11 / 6 + math.hypot(seed_half, image[1] + 11 / 6)
    )
    assert difference.excludes_zero is (difference.interval[1] < 0)


def test_one_noisy_seed_widens_the_interval_until_it_includes_zero() -> None:
    baseline = _cells([13.0, 13.5, 12.0], seed=2)
    steady = paired_difference(_cells([10.0, 10.4, 9.2], seed=1), baseline)
    noisy = paired_difference(_cells([10.0, 10.4, 16.0], seed=1), baseline)
    assert steady.excludes_zero and not noisy.excludes_zero
    assert noisy.seed_half_width > 5 * steady.seed_half_width


def test_pairing_is_by_seed_not_by_position() -> None:
    recipe, baseline = _cells([1.0, 2.0, 3.0]), _cells([1.0, 2.0, 3.0])
    assert paired_difference(recipe, baseline).per_seed == (0.0, 0.0, 0.0)
    reordered = {0: recipe[2], 1: recipe[0], 2: recipe[1]}
    assert paired_difference(reordered, baseline).per_seed == pytest.approx((2.0, -1.0, -1.0))
    # Only the seeds both have.
    assert paired_difference({1: recipe[1]}, baseline).seeds == (1,)


def test_one_seed_borrows_a_spread_and_says_so() -> None:
    recipe, baseline = _cells([10.0]), _cells([12.0], seed=3)
    alone = paired_difference(recipe, baseline)
    assert alone.seed_half_width is None and not alone.seed_spread_lent
    assert alone.interval == pytest.approx(alone.image_interval)
    lent = paired_difference(recipe, baseline, lent_spread=seed_spread([1.0, 2.0, 3.0]))
    assert lent.seed_spread_lent and lent.seed_half_width == pytest.approx(T_975_2DOF * 1.0)
    assert lent.interval[0] < alone.interval[0] and lent.interval[1] > alone.interval[1]


def test_summary_is_mean_and_sample_spread() -> None:
    summary = summarize([1.0, 2.0, 4.0])
    assert summary.mean == pytest.approx(7 / 3)
    assert summary.spread == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert summarize([5.0]).spread is None
    with pytest.raises(ValueError):
        paired_difference({0: _cells([1.0])[0]}, {1: _cells([1.0])[0]})
