"""FID through n×n matrices and its bootstrap: equal to torchmetrics, honest intervals.

Random features stand in for Inception's (D = 256, non-negative like pool3 outputs, a decaying
spectrum); the identities do not depend on D as long as n < D, and torchmetrics' D×D route stays
cheap at this size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.fid import FIDStatistics, frechet_distance, score_against_reference, score_pair
from eval.fid_bootstrap import PairedFID, ReferenceFID, Resample, bootstrap, resamples

D = 256
SCALES = np.linspace(2.0, 0.1, D)  # per-dimension spread: a decaying spectrum


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """(n, D) float64 features: squared uniforms, scaled, optionally shifted."""
    rng = np.random.default_rng(seed)
    return rng.random((n, D)) ** 2 * SCALES + shift


def stats(x: np.ndarray) -> FIDStatistics:
    return FIDStatistics(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=len(x))


REFERENCE = stats(features(600, seed=100, shift=0.05))


def test_low_rank_fid_equals_torchmetrics_for_the_set_and_for_resamples() -> None:
    x = features(60, seed=0)
    score = ReferenceFID(torch.from_numpy(x), REFERENCE.mu, REFERENCE.sigma)
    assert score() == pytest.approx(frechet_distance(stats(x), REFERENCE), rel=1e-6)

    indices = np.random.default_rng(1).integers(0, 60, size=60)  # with repeats
    resampled = score(Resample.from_indices(indices, 60))
    assert resampled == pytest.approx(frechet_distance(stats(x[indices]), REFERENCE), rel=1e-6)
    assert resampled != pytest.approx(score(), rel=1e-3)

    half = resamples(60, 1, seed=2)[0]  # 30 distinct rows
    expected = frechet_distance(stats(x[half.rows.numpy()]), REFERENCE)
    assert (half.n, len(half.rows)) == (30, 30)
    assert score(half) == pytest.approx(expected, rel=1e-6)


def test_paired_fid_equals_torchmetrics_for_the_sets_and_for_a_resample() -> None:
    """The nuclear-norm route. torchmetrics' own rounding noise is larger here (each of its
    D − n zero eigenvalues adds √(rounding) to the trace, against a smaller FID): 2e-6."""
    a, b = features(60, seed=2), features(60, seed=3, shift=0.02)
    score = PairedFID(torch.from_numpy(a), torch.from_numpy(b))
    assert score() == pytest.approx(frechet_distance(stats(a), stats(b)), rel=2e-6)

    indices = np.random.default_rng(4).integers(0, 60, size=60)
    expected = frechet_distance(stats(a[indices]), stats(b[indices]))
    assert score(Resample.from_indices(indices, 60)) == pytest.approx(expected, rel=2e-6)


def test_interval_contains_the_point_and_shrinks_as_n_grows() -> None:
    widths = []
    for n in (40, 160):
        x = torch.from_numpy(features(n, seed=n))
        result = bootstrap(ReferenceFID(x, REFERENCE.mu, REFERENCE.sigma), n, count=200, seed=0)
        low, high = result.interval
        assert low < result.point < high
        widths.append(high - low)
    assert widths[1] < 0.7 * widths[0]  # ~1/√n: 0.5 expected


def test_interval_width_matches_the_spread_of_independent_sets() -> None:
    """Half-samples of one set must predict how much the FID of other sets of the same size
    scatters. Resampling with replacement overstates it here, where FID's small-n bias dominates
    (a resample's number of distinct images varies, and moves the bias): the reason half-sampling
    is the default. The resampled values sit above the point (fewer images, more bias), so the
    plain percentile interval would exclude it: the reason the interval is centred."""
    n = 80
    independent = [
        ReferenceFID(torch.from_numpy(features(n, seed=1000 + i)), REFERENCE.mu, REFERENCE.sigma)()
        for i in range(24)
    ]
    spread = np.std(independent, ddof=1)
    score = ReferenceFID(torch.from_numpy(features(n, seed=7)), REFERENCE.mu, REFERENCE.sigma)
    half = bootstrap(score, n, count=300, seed=0)
    assert 0.6 < np.std(half.samples) / spread < 1.8  # measured 1.29
    with_replacement = bootstrap(score, n, count=300, seed=0, scheme="replacement")
    assert np.std(with_replacement.samples) / spread > 3  # measured 6.2

    assert half.bias > 2 * spread
    assert half.percentiles[0] > half.point  # the whole plain percentile interval is above
    low, high = half.interval
    assert low < half.point < high


def test_resamples_are_a_function_of_n_and_seed() -> None:
    first, again, other = resamples(30, 3, seed=5), resamples(30, 3, seed=5), resamples(30, 3, 6)
    assert all(torch.equal(a.rows, b.rows) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a.rows, b.rows) for a, b in zip(first, other, strict=True))
    assert all(resample.n == 15 and len(set(resample.rows.tolist())) == 15 for resample in first)
    assert all(resample.n == 30 for resample in resamples(30, 3, seed=5, scheme="replacement"))


def test_paired_resamples_make_a_difference_interval_narrower_than_either() -> None:
    """Two models scored with one seed see the same resamples: for a student that is its teacher
    plus small noise, the resampled FID differences barely vary, unlike the FIDs themselves."""
    from eval.fid_bootstrap import difference_interval

    teacher = features(80, seed=11)
    student = teacher + 0.02 * np.random.default_rng(12).standard_normal(teacher.shape)
    kwargs = {"resamples": 200, "seed": 3}
    scores = [
        score_against_reference(torch.from_numpy(x).float(), REFERENCE, **kwargs)
        for x in (teacher, student)
    ]
    difference = difference_interval(scores[0].bootstrap, scores[1].bootstrap)
    width = lambda interval: interval[1] - interval[0]
    assert width(difference.interval) < 0.2 * width(scores[0].bootstrap.interval)
    assert difference.point == pytest.approx(scores[1].value - scores[0].value)


def test_scores_carry_their_interval_and_say_how_it_was_made() -> None:
    x = torch.from_numpy(features(50, seed=20)).float()
    result = score_against_reference(x, REFERENCE, resamples=50, seed=9).metric("how")
    assert result.n == 50 and result.interval[0] < result.value < result.interval[1]
    assert "50 half-samples (25 of the 50 images, without replacement), seed 9" in result.detail

    sub = score_against_reference(x, REFERENCE, resamples=50, seed=9, max_bootstrap_images=30)
    assert sub.value == pytest.approx(result.value)  # the point uses all 50
    assert sub.bootstrap.interval[0] < sub.value < sub.bootstrap.interval[1]
    assert "30-image subsample of the 50" in sub.bootstrap.describe()

    y = torch.from_numpy(features(50, seed=21)).float()
    pair = score_pair(x, y, resamples=50, seed=9)
    assert pair.value == pytest.approx(
        frechet_distance(stats(x.double().numpy()), stats(y.double().numpy())), rel=1e-5
    )
    assert score_pair(x, y, resamples=0).bootstrap is None
