"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), by torchmetrics, from
logits computed elsewhere (the feature pass of `eval.metrics.features`, the in-domain judge).

It needs the Inception classifier head. torch-fidelity's weights (`weights-inception-2015-12-05-
6726825d.pth`, the network BK-SDM's IS used via `fidelity --isc`) have it; the offline fid-helper
network ends at pool3 and has none. So IS runs when torch-fidelity's file is given, already in the
torch hub cache, or downloadable, and is "unavailable: <reason>" otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore

from eval.inception import (
    TORCH_FIDELITY_FILE,
    download_torch_fidelity_weights,
    has_classifier_head,
    torch_fidelity_cached_weights,
)
from eval.results import MetricUnavailable

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


def inception_score_of_logits(
    logits: torch.Tensor, splits: int, seed: int = 0
) -> tuple[float, float]:
    """(mean, std over splits) of the Inception Score of (N, C) logits, by torchmetrics (which
    shuffles before splitting; `seed` fixes that shuffle)."""
    metric = InceptionScore(feature=nn.Identity(), splits=splits)
    metric.update(logits.detach().to("cpu", torch.float64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
