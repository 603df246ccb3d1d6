"""Fréchet Inception Distance (Heusel et al. 2017) against a reference image set.

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)

over 2048-d pool3 features of the standard TF Inception (`eval.inception`). Features come from
torchmetrics' `NoTrainInceptionV3` (torch-fidelity's network, TF1-compatible resize to 299) and the
distance from torch-fidelity's `fid_statistics_to_metric`. We keep (μ, Σ) rather than a
`FrechetInceptionDistance` object because reference statistics are computed once, cached, and
exchanged as `.npz` files (keys `mu`, `sigma`, as pytorch-fid and clean-fid write them; statistics
from other extractors or resizers are not comparable).

A reference is an image folder, a `datasets.Dataset` with an image column, or such an `.npz`.
Statistics of a folder or dataset are cached under `$SD_DISTILL_CACHE/fid-stats/`, keyed by the
content of the reference, the Inception weights and the resize option.

The generated set's features are kept (n × 2048 float32: 245 MB at 30K), so every FID carries an
interval from resampling them (half-samples, `eval.fid_bootstrap`) and the FID between two
generated sets (the student's and the teacher's) can be resampled in pairs. Below 2048 images
the distance itself is computed exactly through n×n matrices (`eval.fid_bootstrap`), equal to
`frechet_distance` and cheaper (0.2 s against 3.8 s at n = 500, one core).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torchmetrics.image.fid import NoTrainInceptionV3
from tqdm.auto import tqdm

from core.atomic import atomic_path
from core.errors import UserInputError
from core.paths import default_cache_root
from eval.fid_bootstrap import (
    DEFAULT_RESAMPLES,
    MIN_ROWS,
    BootstrapResult,
    PairedFID,
    ReferenceFID,
    bootstrap,
)
from eval.image_io import list_images, uint8_batches
from eval.inception import (
    load_inception,
    preprocessed_input,
    resolve_inception_weights,
    run_inception,
    weights_digest,
)
from eval.results import MetricResult, MetricUnavailable

# Changes whenever the preprocessing in front of the network changes (it is part of the cache key).
PREPROCESSING_ID = "rgb-uint8/tf1-bilinear-299/pool3-2048"
# A bootstrap of n images costs ~10 ms per resample at n = 500 and grows as n³ (an n×n
# eigenproblem): above this many images the interval comes from a seeded subsample.
DEFAULT_MAX_BOOTSTRAP_IMAGES = 1000


@dataclass(frozen=True)
class FIDStatistics:
    """Mean `mu` (D,) and unbiased covariance `sigma` (D, D) of Inception features, float64;
    `n` = number of images (None when loaded from a file that does not record it)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"n": np.int64(self.n)} if self.n is not None else {}
        with open(path, "wb") as handle:  # an open handle stops numpy from appending ".npz"
            np.savez(handle, mu=self.mu, sigma=self.sigma, **extra)
        return path

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FIDStatistics:
        """Moments of (n, D) features, accumulated in float64."""
        accumulator = MomentAccumulator()
        accumulator.update(features)
        return accumulator.statistics()

    @classmethod
    def load(cls, path: str | Path) -> FIDStatistics:
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                n = int(data["n"]) if "n" in data.files else None
        except (OSError, ValueError, KeyError) as error:
            raise UserInputError(
                f"{str(path)!r} is not an .npz with 'mu' and 'sigma': {error}"
            ) from error
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserInputError(
                f"{str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not match"
            )
        return cls(mu=mu, sigma=sigma, n=n)


class MomentAccumulator:
    """Running Σx and Σxxᵀ in float64 (as torchmetrics' FID keeps its state), so 30K images never
    need their features held at once."""

    def __init__(self) -> None:
        self.n = 0
        self.feature_sum: torch.Tensor | None = None  # (D,)
        self.outer_sum: torch.Tensor | None = None  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", torch.float64)  # (B, D)
        if self.feature_sum is None:
            dim = features.shape[1]
            self.feature_sum = torch.zeros(dim, dtype=torch.float64)
            self.outer_sum = torch.zeros(dim, dim, dtype=torch.float64)
        self.feature_sum += features.sum(dim=0)
        self.outer_sum += features.T @ features
        self.n += features.shape[0]

    def statistics(self) -> FIDStatistics:
        if self.n < 2:
            raise UserInputError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.feature_sum / self.n
        sigma = (self.outer_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return FIDStatistics(mu=mu.numpy(), sigma=sigma.numpy(), n=self.n)


def image_statistics(
    images: Sequence[str | Path | Image.Image],
    inception: NoTrainInceptionV3 | None = None,
    *,
    batch_size: int = 32,
    resize_to: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "Inception features",
    preprocessing: str = "torch-fidelity",
) -> FIDStatistics:
    """(μ, Σ) of the pool3 features of `images` (paths or PIL images); ≥ 2 images required.
    `preprocessing`: how images reach the network (`eval.inception.PREPROCESSINGS`)."""
    if len(images) < 2:
        raise UserInputError(f"FID needs at least 2 images per set, got {len(images)}")
    inception = inception if inception is not None else load_inception(device=device)
    accumulator = MomentAccumulator()
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in uint8_batches(images, batch_size, resize_to):  # (B, 3, H, W) uint8
            batch = batch.to(device)
            with preprocessed_input(inception, batch, preprocessing):
                accumulator.update(inception(batch))  # (B, 2048)
            bar.update(len(batch))
    bar.close()
    return accumulator.statistics()


def image_features(
    images: Sequence[str | Path | Image.Image],
    inception: NoTrainInceptionV3,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "Inception features",
) -> torch.Tensor:
    """Pool3 features of `images`, (n, 2048) float32 on the CPU, in the order given."""
    features, _ = run_inception(
        images, inception, batch_size=batch_size, device=device, progress=progress, desc=desc
    )
    return features


@dataclass(frozen=True)
class FIDScore:
    """An FID point value on `n` images and, when asked for, its bootstrap."""

    value: float
    n: int
    bootstrap: BootstrapResult | None = None

    def metric(self, detail: str) -> MetricResult:
        if self.bootstrap is None:
            return MetricResult(value=self.value, n=self.n, detail=detail)
        return MetricResult(
            value=self.value,
            n=self.n,
            detail=f"{detail}; {self.bootstrap.describe()}",
            interval=self.bootstrap.interval,
        )


def score_against_reference(
    features: torch.Tensor,
    reference: FIDStatistics,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    max_bootstrap_images: int = DEFAULT_MAX_BOOTSTRAP_IMAGES,
) -> FIDScore:
    """FID of generated features (n, D) against reference statistics, with a bootstrap interval
    (`resamples` = 0: none). Sets of the same n and seed get the same resamples (paired)."""
    n = features.shape[0]
    if n < 2:
        raise UserInputError(f"FID needs at least 2 images per set, got {n}")
    if features.shape[1] != reference.mu.shape[0]:
        raise UserInputError(
            f"feature sizes differ: {features.shape[1]} vs {reference.mu.shape[0]}"
        )
    exact = ReferenceFID(features, reference.mu, reference.sigma) if n < features.shape[1] else None
    if exact is not None:
        value = exact()
    else:
        value = frechet_distance(FIDStatistics.from_features(features), reference)
    if resamples == 0 or n < MIN_ROWS:  # no interval asked for, or too few images for one
        return FIDScore(value, n)
    rows = _bootstrap_rows(n, max_bootstrap_images, seed)
    if rows is None:
        score = (
            exact if exact is not None else ReferenceFID(features, reference.mu, reference.sigma)
        )
        return FIDScore(value, n, bootstrap(score, n, count=resamples, seed=seed))
    score = ReferenceFID(features[rows], reference.mu, reference.sigma)
    result = bootstrap(score, len(rows), count=resamples, seed=seed)
    return FIDScore(value, n, result.recentred(value, n))


def score_pair(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    max_bootstrap_images: int = DEFAULT_MAX_BOOTSTRAP_IMAGES,
) -> FIDScore:
    """FID between two generated sets (n, D) whose row i belong together (same prompt and seed),
    with a paired bootstrap interval: each resample takes the same rows from both sets."""
    if a.shape != b.shape:
        raise UserInputError(
            f"paired FID needs sets of one size: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    n = a.shape[0]
    if n < 2:
        raise UserInputError(f"FID needs at least 2 images per set, got {n}")
    exact = PairedFID(a, b) if n < a.shape[1] else None
    if exact is not None:
        value = exact()
    else:
        value = frechet_distance(FIDStatistics.from_features(a), FIDStatistics.from_features(b))
    if resamples == 0 or n < MIN_ROWS:  # no interval asked for, or too few images for one
        return FIDScore(value, n)
    rows = _bootstrap_rows(n, max_bootstrap_images, seed)
    if rows is None:
        score = exact if exact is not None else PairedFID(a, b)
        return FIDScore(value, n, bootstrap(score, n, count=resamples, seed=seed))
    result = bootstrap(PairedFID(a[rows], b[rows]), len(rows), count=resamples, seed=seed)
    return FIDScore(value, n, result.recentred(value, n))


def _bootstrap_rows(n: int, max_images: int, seed: int) -> torch.Tensor | None:
    """None (bootstrap all n rows), or a seeded sorted subsample of `max_images` rows."""
    if n <= max_images:
        return None
    rows = np.random.default_rng(seed).choice(n, size=max_images, replace=False)
    return torch.from_numpy(np.sort(rows))


def folder_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"image folder {str(folder)!r} does not exist")
    return list_images(folder)


def save_folder_statistics(
    folder: str | Path, npz_path: str | Path, **kwargs: Any
) -> FIDStatistics:
    """Compute (μ, Σ) of an image folder and save them as a pytorch-fid-style `.npz`.

    `kwargs` go to `image_statistics` (inception, batch_size, resize_to, device, progress).
    """
    statistics = image_statistics(folder_images(folder), **kwargs)
    statistics.save(npz_path)
    return statistics


def reference_statistics(
    reference: str | Path | Any,
    inception: NoTrainInceptionV3 | None = None,
    *,
    image_column: str = "image",
    resize_to: int | None = None,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    preprocessing: str = "torch-fidelity",
) -> FIDStatistics:
    """Statistics of a reference: an `.npz` (`mu`, `sigma`), an image folder or a
    `datasets.Dataset` whose `image_column` holds images. Folder and dataset statistics are cached
    (key: reference content + Inception weights + `resize_to` + `preprocessing`)."""
    if is_npz_reference(reference):
        return FIDStatistics.load(reference)
    images = reference_images(reference, image_column)
    weights = resolve_inception_weights(weights_path, cache_dir)
    key = hashlib.sha256(
        f"{_content_key(reference, images, image_column)}|{weights_digest(weights)}|"
        f"{PREPROCESSING_ID}|{resize_to}{_preprocessing_key(preprocessing)}".encode()
    ).hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_root()) / "fid-stats" / f"{key}.npz"
    if cache_file.is_file():
        return FIDStatistics.load(cache_file)
    if inception is None:
        inception = load_inception(weights_path=weights, device=device)
    statistics = image_statistics(
        images,
        inception,
        batch_size=batch_size,
        resize_to=resize_to,
        device=device,
        progress=progress,
        desc="FID reference",
        preprocessing=preprocessing,
    )
    with atomic_path(cache_file) as partial:  # the pid in its name: concurrent runs never collide
        statistics.save(partial)
    return statistics


def reference_images(reference: str | Path | Any, image_column: str = "image") -> Sequence[Any]:
    """The images of a folder or dataset reference (lazily decoded); at least 2."""
    if isinstance(reference, str | Path):
        images: Sequence[Any] = folder_images(reference)
    else:
        column_names = getattr(reference, "column_names", None)
        if column_names is None:
            raise UserInputError(f"unsupported FID reference {type(reference).__name__}")
        if image_column not in column_names:
            raise UserInputError(
                f"reference dataset has no column {image_column!r} ({column_names})"
            )
        images = _DatasetImages(reference, image_column)
    if len(images) < 2:
        raise UserInputError(
            f"FID reference {_describe(reference)} has {len(images)} images; need ≥ 2"
        )
    return images


def frechet_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    """FID between two Gaussians, by torch-fidelity's public `fid_statistics_to_metric` in float64
    (equal to torchmetrics' to 1e-10 for full-rank covariances, to 3e-8 when n < 2048: the two
    LAPACK builds round the near-zero eigenvalues differently; tested). Its eigenvalue route,
    Tr((Σ_a Σ_b)^½) = Σ √λ_i(Σ_a Σ_b), stays finite for the rank-deficient Σ of small sets."""
    if a.mu.shape != b.mu.shape:
        raise UserInputError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    as_float64 = lambda s: {
        "mu": np.asarray(s.mu, dtype=np.float64),
        "sigma": np.asarray(s.sigma, dtype=np.float64),
    }
    result = fid_statistics_to_metric(as_float64(a), as_float64(b), verbose=False)
    return float(result[KEY_METRIC_FID])


def compute_fid(
    generated: str | Path | Sequence[str | Path | Image.Image],
    reference: str | Path | Any,
    *,
    image_column: str = "image",
    reference_resize: int | None = None,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    max_bootstrap_images: int = DEFAULT_MAX_BOOTSTRAP_IMAGES,
) -> MetricResult:
    """FID of `generated` (a folder or a list of images) against `reference` (see
    `reference_statistics`; `reference_resize` squares reference images first, e.g. 256 for
    BK-SDM's COCO protocol), with a bootstrap interval over the generated images
    (`bootstrap_resamples` = 0: none). Missing Inception weights give an "unavailable" result."""
    images = folder_images(generated) if isinstance(generated, str | Path) else list(generated)
    if len(images) < 2:
        raise UserInputError(f"FID needs at least 2 generated images, got {len(images)}")
    if not is_npz_reference(reference):
        reference_images(reference, image_column)  # bad input fails before the network loads
    try:
        inception = load_inception(weights_path=weights_path, cache_dir=cache_dir, device=device)
    except MetricUnavailable as reason:
        return MetricResult.missing(str(reason))
    reference_stats = reference_statistics(
        reference,
        inception,
        image_column=image_column,
        resize_to=reference_resize,
        weights_path=weights_path,
        cache_dir=cache_dir,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    features = image_features(
        images, inception, batch_size=batch_size, device=device, progress=progress
    )
    score = score_against_reference(
        features,
        reference_stats,
        resamples=bootstrap_resamples,
        seed=bootstrap_seed,
        max_bootstrap_images=max_bootstrap_images,
    )
    return score.metric(reference_detail(score.n, reference_stats, reference))


def reference_detail(n: int, reference_stats: FIDStatistics, reference: Any) -> str:
    """How an FID against `reference` was measured (for the report)."""
    n_reference = reference_stats.n if reference_stats.n is not None else "?"
    return (
        f"{n} generated vs {n_reference} reference images ({_describe(reference)}); "
        "TF-Inception pool3 via torchmetrics"
    )


def _preprocessing_key(preprocessing: str) -> str:
    """Nothing for the default (statistics cached before the choice existed stay valid)."""
    return "" if preprocessing == "torch-fidelity" else f"|{preprocessing}"


def is_npz_reference(reference: Any) -> bool:
    """True when `reference` names precomputed statistics (an .npz) rather than images."""
    return isinstance(reference, str | Path) and Path(reference).suffix == ".npz"


def _content_key(reference: Any, images: Sequence[Any], image_column: str) -> str:
    """What identifies the reference's content: file names and bytes for a folder, datasets' own
    fingerprint (its content/transform hash, what its cache files are keyed on) for a Dataset."""
    if isinstance(reference, str | Path):
        digest = hashlib.sha256()
        for path in images:  # a changed, added or renamed file changes the key
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return f"folder:{digest.hexdigest()}"
    return f"dataset:{reference._fingerprint}:{image_column}:{len(reference)}"


class _DatasetImages(Sequence):
    """Lazy view of one image column, so a large dataset is decoded one image at a time."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Image.Image:  # type: ignore[override]
        return self.dataset[index][self.column]

    def __iter__(self):
        for index in range(len(self)):
            yield self.dataset[index][self.column]


def _describe(reference: Any) -> str:
    if isinstance(reference, str | Path):
        return str(reference)
    return f"dataset {getattr(reference, '_fingerprint', type(reference).__name__)}"
