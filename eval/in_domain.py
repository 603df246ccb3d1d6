"""In-domain metrics for the offline Fashion-MNIST world, judged by its own classifier.

    class accuracy   share of images the classifier labels as their prompt's class: the offline
                     world's text-alignment score (CLIP score's role, which needs CLIP weights)
    IS (in-domain)   Salimans et al.'s exp(E_x KL(p(y|x) ‖ p(y))), torchmetrics' InceptionScore
                     with the classifier's logits as its `feature`: 1 (every image alike or
                     unrecognisable) to 10 (confident and class-balanced)

Both measure against Fashion-MNIST's 10 classes, not ImageNet's: they stand next to CLIP score and
the Inception IS in the report, labelled in-domain, never in their place.

A prompt's class is read by exact lookup in the table of every caption the offline world makes
(`caption_for(label, template)` for each class and template), the captions `fashion_prompts`
draws from: "a photo of a dress" is class 3, "A photo of a dress!" is no class at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchmetrics.image.inception import InceptionScore

from eval.fashion_classifier import FashionClassifier
from eval.image_io import uint8_batches
from eval.results import MetricResult, MetricUnavailable
from offline.fashion_mnist import CAPTION_TEMPLATES, FASHION_CLASSES, caption_for


@lru_cache(maxsize=1)
def fashion_caption_classes() -> dict[str, int]:
    """Every caption of the offline world -> its class id (10 classes × 3 templates)."""
    table = {
        caption_for(label, template): label
        for label in range(len(FASHION_CLASSES))
        for template in range(len(CAPTION_TEMPLATES))
    }
    if len(table) != len(FASHION_CLASSES) * len(CAPTION_TEMPLATES):
        raise RuntimeError("two Fashion-MNIST captions coincide; the class lookup is ambiguous")
    return table


def prompt_classes(prompts: Sequence[str]) -> list[int]:
    """The class of each prompt, or MetricUnavailable naming the first prompt that has none."""
    table = fashion_caption_classes()
    unknown = [prompt for prompt in prompts if prompt not in table]
    if unknown:
        raise MetricUnavailable(
            f"{len(unknown)} of {len(prompts)} prompts are not Fashion-MNIST class captions "
            f"(first: {unknown[0]!r})"
        )
    return [table[prompt] for prompt in prompts]


def is_fashion_prompt_set(prompts: Sequence[str]) -> bool:
    """True when at least one prompt is a Fashion-MNIST caption: in-domain metrics apply (and
    say why not, if some prompts are something else)."""
    table = fashion_caption_classes()
    return any(prompt in table for prompt in prompts)


def _images_uint8(images: Sequence[str | Path | Image.Image], batch_size: int = 256):
    return uint8_batches(images, batch_size)  # (B, 3, H, W) uint8 batches, decoded as for FID


def judged_correct(
    images: Sequence[str | Path | Image.Image], labels: torch.Tensor, classifier: FashionClassifier
) -> torch.Tensor:
    """1.0 where `classifier` labels `images[i]` as class `labels[i]`, else 0.0: (N,) float32."""
    predicted = torch.cat([classifier.predict(batch) for batch in _images_uint8(images)])  # (N,)
    return (predicted == labels).float()


def class_accuracy(
    images: Sequence[str | Path | Image.Image],
    prompts: Sequence[str],
    classifier: FashionClassifier,
) -> MetricResult:
    """Share of `images[i]` that `classifier` labels as the class of `prompts[i]`."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
    try:
        labels = torch.tensor(prompt_classes(prompts))  # (N,)
    except MetricUnavailable as reason:
        return MetricResult.missing(str(reason))
    correct = judged_correct(images, labels, classifier)  # (N,)
    per_class = []
    for label, name in enumerate(FASHION_CLASSES):
        mask = labels == label
        if mask.any():
            per_class.append(f"{name} {float(correct[mask].mean()):.2f}")
    return MetricResult(
        value=float(correct.mean()),
        n=len(images),
        detail=f"in-domain: judged by a {classifier.describe()}; per class: {', '.join(per_class)}",
    )


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


@torch.no_grad()
def in_domain_inception_score(
    images: Sequence[str | Path | Image.Image],
    classifier: FashionClassifier,
    *,
    splits: int = 10,
    seed: int = 0,
) -> MetricResult:
    """IS of `images` with the Fashion-MNIST classifier's logits in place of Inception's."""
    if len(images) < splits:
        raise ValueError(f"IS with {splits} splits needs ≥ {splits} images, got {len(images)}")
    module = classifier.logits_module
    logits = torch.cat([module(batch).cpu() for batch in _images_uint8(images)])  # (N, 10)
    mean, std = inception_score_of_logits(logits, splits, seed)
    return MetricResult(
        value=mean,
        n=len(images),
        detail=f"in-domain: {splits} splits (shuffle seed {seed}), std {std:.3g}; logits of a "
        f"{classifier.describe()}; range 1-{len(FASHION_CLASSES)}",
    )
