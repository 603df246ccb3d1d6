"""One pass of the FID Inception network over a row's images: pool3 features for FID and the
fidelity FID, and the classifier head's logits for IS, from the same forward.

Two preprocessings reach the same TF-Inception weights:

    torch-fidelity   uint8 images, TF1-compatible bilinear resize to 299, (x − 128) / 128
                     (torch-fidelity, torchmetrics; the project's default)
    pytorch-fid      [0, 1] floats, `F.interpolate(299, bilinear, align_corners=False)`,
                     2x − 1 (pytorch-fid's `InceptionV3(resize_input, normalize_input)`: what
                     BK-SDM's FID ran, `distill eval --parity bk-sdm`)

The network (torchmetrics' `NoTrainInceptionV3`, torch-fidelity's layout) applies the first
itself; the second replaces the input of its first convolution with pytorch-fid's tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eval.inception import (
    FEATURE_DIM,
    PREPROCESSINGS,
    has_classifier_head,
    load_inception,
    resolve_inception_weights,
    run_inception,
)
from eval.inception_score import NO_HEAD_DETAIL, classifier_weights
from eval.metrics.base import Features
from eval.results import MetricResult, MetricUnavailable

POOL3, LOGITS = str(FEATURE_DIM), "logits_unbiased"


class FeatureNetwork:
    """The loaded network, whether it has the classifier head, and why not when it has none."""

    def __init__(
        self, network: Any, with_logits: bool, logits_missing: MetricResult | None
    ) -> None:
        self.network = network
        self.with_logits = with_logits
        self.logits_missing = logits_missing


def load_feature_network(
    *,
    want_logits: bool,
    weights_path: str | Path | None,
    cache_dir: str | Path | None,
    allow_download: bool,
    device: torch.device,
) -> FeatureNetwork:
    """The Inception network, with its classifier head when `want_logits` and a file with one is
    at hand (torch-fidelity's: the same network, pool3 included). Raises `MetricUnavailable` when
    there are no FID Inception weights at all."""
    logits_missing = None
    weights = None
    if want_logits:
        try:
            weights = classifier_weights(weights_path, allow_download)
        except MetricUnavailable as reason:
            logits_missing = MetricResult.missing(str(reason), detail=NO_HEAD_DETAIL)
    if weights is None:
        weights = resolve_inception_weights(weights_path, cache_dir, allow_download)
    with_logits = want_logits and logits_missing is None and has_classifier_head(weights)
    if want_logits and not with_logits and logits_missing is None:
        logits_missing = MetricResult.missing(
            f"{Path(weights).name} has no classifier head", detail=NO_HEAD_DETAIL
        )
    features = [POOL3, LOGITS] if with_logits else [POOL3]
    network = load_inception(features, weights_path=weights, device=device)
    return FeatureNetwork(network, with_logits, logits_missing)


def compute_features(
    images: Sequence[str | Path],
    source: FeatureNetwork,
    *,
    preprocessing: str = "torch-fidelity",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "Inception features",
) -> Features:
    """Pool3 features (n, 2048) and, where the head exists, logits (n, 1008) of `images`
    (`eval.inception.run_inception`: one pass, the logits on torch-fidelity's preprocessing)."""
    pool3, logits = run_inception(
        images,
        source.network,
        with_logits=source.with_logits,
        preprocessing=preprocessing,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=desc,
    )
    return Features(pool3=pool3, logits=logits, preprocessing=PREPROCESSINGS[preprocessing])
