"""Recipes compared over training seeds: per-recipe summaries and paired differences whose
intervals count both sources of noise.

A comparison trains recipe r with seeds s = 1..S and scores every final student on the same n
images (same prompts, same generation seeds). One metric of one student is a `CellScore`: its
value on the n images and its values on R half-samples of the image rows, the same R draws for
every student (`eval.fid_bootstrap.resamples` is a pure function of n, R and its seed).

The difference between recipe r and a baseline b is paired twice: by training seed (run s of r
against run s of b, the same data order and noise draws) and by image row. Its point estimate is

    d̄ = (1/S) Σ_s d_s,      d_s = m(r, s) − m(b, s)

and its interval adds two half-widths in quadrature, each at the stated confidence:

    seeds   t_{S−1} · sd(d_s) / √S         how much d̄ moves with other training seeds
    images  the basic half-sample interval of (1/S) Σ_s [m*(r, s) − m*(b, s)] around d̄:
            how much it moves with another draw of prompts and generation seeds

The seed term already holds the image noise that differs between runs, so adding the image term
counts part of that noise twice: the interval is conservative, never too narrow for that reason.
With S = 1 no seed spread is measured here; `seed_spread` can lend one from a run with more seeds
(the same recipe at another compute), and the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class CellScore:
    """One metric of one trained student: on all n images, and on R shared half-samples."""

    point: float
    resampled: np.ndarray  # (R,)


@dataclass(frozen=True)
class SeedSpread:
    """The standard deviation of one run's value across training seeds, and its degrees of
    freedom (seeds − 1): lent to a single-seed difference."""

    std: float
    dof: int


@dataclass(frozen=True)
class Summary:
    """A metric over a recipe's seeds: the mean and the sample standard deviation (None for one
    seed), with every seed's value."""

    mean: float
    spread: float | None
    values: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "spread": self.spread, "values": list(self.values)}


@dataclass(frozen=True)
class Difference:
    """recipe − baseline: the mean paired difference over `seeds`, with its interval and the two
    half-widths behind it (`seed_half_width` None: no seed spread known)."""

    point: float
    interval: tuple[float, float]
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]
    seed_half_width: float | None
    image_interval: tuple[float, float]
    confidence: float
    seed_spread_lent: bool = False

    @property
    def excludes_zero(self) -> bool:
        low, high = self.interval
        return low > 0 or high < 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["interval"] = list(self.interval)
        data["image_interval"] = list(self.image_interval)
        data["seeds"], data["per_seed"] = list(self.seeds), list(self.per_seed)
        data["excludes_zero"] = self.excludes_zero
        return data


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("a summary needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    spread = float(array.std(ddof=1)) if len(array) > 1 else None
    return Summary(float(array.mean()), spread, tuple(float(v) for v in array))


def seed_spread(values: Sequence[float]) -> SeedSpread | None:
    """The spread of `values` across seeds, to lend to single-seed differences; None for one."""
    if len(values) < 2:
        return None
    return SeedSpread(float(np.std(values, ddof=1)), len(values) - 1)


def paired_difference(
    recipe: Mapping[int, CellScore],
    baseline: Mapping[int, CellScore],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    lent_spread: SeedSpread | None = None,
) -> Difference:
    """`recipe − baseline` over the training seeds both have (module docstring). `lent_spread`
    gives the per-seed spread of the difference when only one seed is shared."""
    seeds = tuple(sorted(set(recipe) & set(baseline)))
    if not seeds:
        raise ValueError("a paired difference needs at least one training seed in common")
    per_seed = np.array([recipe[s].point - baseline[s].point for s in seeds])  # (S,)
    point = float(per_seed.mean())
    resampled = np.mean([recipe[s].resampled - baseline[s].resampled for s in seeds], axis=0)
    image_low, image_high = basic_interval(point, resampled, confidence)
    seed_half, lent = _seed_half_width(per_seed, confidence, lent_spread)
    seed_term = seed_half or 0.0
    low = point - math.hypot(seed_term, point - image_low)
    high = point + math.hypot(seed_term, image_high - point)
    return Difference(
        point=point,
        interval=(low, high),
        seeds=seeds,
        per_seed=tuple(float(d) for d in per_seed),
        seed_half_width=seed_half,
        image_interval=(image_low, image_high),
        confidence=confidence,
        seed_spread_lent=lent,
    )


def basic_interval(point: float, resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """The basic bootstrap interval: the resampled values' spread, around the point (as
    `eval.fid_bootstrap.BootstrapResult.interval`)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    mean = float(resampled.mean())
    return point - (float(high) - mean), point - (float(low) - mean)


def _seed_half_width(
    per_seed: np.ndarray, confidence: float, lent: SeedSpread | None
) -> tuple[float | None, bool]:
    quantile = 1 - (1 - confidence) / 2
    if len(per_seed) > 1:
        std, dof = float(per_seed.std(ddof=1)), len(per_seed) - 1
        return float(stats.t.ppf(quantile, dof)) * std / math.sqrt(len(per_seed)), False
    if lent is None:
        return None, False
    return float(stats.t.ppf(quantile, lent.dof)) * lent.std, True
