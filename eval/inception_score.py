"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), by torchmetrics.

It needs the Inception classifier head. torch-fidelity's weights (`weights-inception-2015-12-05-
6726825d.pth`, the network BK-SDM's IS used via `fidelity --isc`) have it; the offline fid-helper
network ends at pool3 and has none. So IS runs when torch-fidelity's file is given, already in the
torch hub cache, or downloadable, and is "unavailable: <reason>" otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchmetrics.image.inception import InceptionScore
from tqdm.auto import tqdm

from core.errors import UserInputError
from eval.image_io import uint8_batches
from eval.inception import (
    TORCH_FIDELITY_FILE,
    download_torch_fidelity_weights,
    has_classifier_head,
    load_inception,
    torch_fidelity_cached_weights,
)
from eval.results import MetricResult, MetricUnavailable

logger = logging.getLogger(__name__)

NO_HEAD_REASON = "no Inception classifier head offline"
NO_HEAD_DETAIL = (
    "the offline fid-helper network ends at pool3; IS needs torch-fidelity's weights "
    f"({TORCH_FIDELITY_FILE}) in the torch hub cache, as a file, or downloadable"
)


def classifier_weights(weights_path: str | Path | None = None, allow_download: bool = True) -> Path:
    """torch-fidelity's Inception weights with the classifier head, or MetricUnavailable."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MetricUnavailable(f"Inception weights file {str(path)!r} does not exist")
        if not has_classifier_head(path):
            raise MetricUnavailable(f"{path.name} has no classifier head")
        return path
    cached = torch_fidelity_cached_weights()
    if cached is not None:
        return cached
    if not allow_download:
        raise MetricUnavailable(NO_HEAD_REASON)
    try:
        return download_torch_fidelity_weights()
    except MetricUnavailable as error:
        # The report says why in words; the raw error (a DNS failure offline, a bad hash) goes to
        # the log, for whoever debugs the download.
        logger.warning("Inception Score: %s", error)
        raise MetricUnavailable(NO_HEAD_REASON) from error


def inception_score(
    images: Sequence[str | Path | Image.Image],
    *,
    weights_path: str | Path | None = None,
    allow_download: bool = True,
    splits: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> MetricResult:
    """Inception Score of `images` (mean over `splits` groups; the std goes into `detail`).

    torchmetrics shuffles the images before splitting; `seed` fixes that shuffle.
    """
    if len(images) < splits:
        raise UserInputError(f"Inception Score with {splits} splits needs ≥ {splits} images")
    try:
        weights = classifier_weights(weights_path, allow_download)
    except MetricUnavailable as reason:
        return MetricResult.missing(str(reason), detail=NO_HEAD_DETAIL)
    network = load_inception("logits_unbiased", weights_path=weights, device=device)
    metric = InceptionScore(feature=network, splits=splits)
    bar = tqdm(total=len(images), desc="Inception Score", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in uint8_batches(images, batch_size):  # (B, 3, H, W) uint8
            metric.update(batch.to(device))
            bar.update(len(batch))
    bar.close()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return MetricResult(
        value=float(mean),
        n=len(images),
        detail=f"{splits} splits, std {float(std):.4g}; torch-fidelity Inception via torchmetrics",
    )
