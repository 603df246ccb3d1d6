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

import dataclasses
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.errors import UserInputError
from eval.image_io import uint8_batches
from eval.inception_score import inception_score_of_logits
from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.results import MetricResult, MetricUnavailable
from offline.fashion_classifier import (
    ClassifierSettings,
    FashionClassifier,
    load_fashion_classifier,
)
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


class FashionJudge:
    """The classifier as the recipe comparison reads it: image by image, does it show its
    prompt's class (`eval.model_scores`; registered as the `sd_distill.judges` entry point)."""

    def __init__(self, classifier: FashionClassifier) -> None:
        self.classifier = classifier
        self.key = classifier.key
        self.test_accuracy = classifier.test_accuracy

    @staticmethod
    def applies(prompts: Sequence[str]) -> bool:
        """Checked before `load`: a COCO comparison never trains the Fashion-MNIST classifier."""
        return is_fashion_prompt_set(prompts)

    @classmethod
    def load(
        cls,
        settings: ClassifierSettings | None = None,
        *,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> FashionJudge:
        """The cached classifier for `settings` (trained first if there is none)."""
        return cls(
            load_fashion_classifier(settings, cache_dir=cache_dir, device=device, progress=progress)
        )

    def correct(self, images: Sequence[str | Path], prompts: Sequence[str]) -> torch.Tensor:
        """(n,) float32: 1.0 where the classifier sees prompt i's class in image i."""
        return judged_correct(images, torch.tensor(prompt_classes(prompts)), self.classifier)


class FashionInDomain(Metric):
    """Class accuracy and IS (in-domain), for Fashion-MNIST prompts: the offline world's stand-ins
    for CLIP score and the Inception IS, judged by its own classifier. Registered with `evaluate`
    through the `sd_distill.metrics` entry point; `options.plugins["fashion_classifier"]` is a
    trained `FashionClassifier` or the `ClassifierSettings` of the cached one (None: defaults)."""

    key = "in_domain"
    columns = (
        Column("class_accuracy", "class acc. (in-domain) ↑", lambda v: f"{100 * v:.1f}%", True),
        Column("in_domain_is", "IS (in-domain) ↑", lambda v: f"{v:.2f}", optional=True),
    )
    needs = frozenset({Need.IMAGES, Need.PROMPTS})

    def __init__(self) -> None:
        self.judge: FashionClassifier | None = None

    def applies(self, context: EvalContext) -> bool:
        return is_fashion_prompt_set(context.prompts)

    def prepare(self, context: EvalContext) -> None:
        given = context.options.plugins.get("fashion_classifier")
        if isinstance(given, FashionClassifier):
            self.judge = given
            return
        try:
            self.judge = load_fashion_classifier(
                given,
                cache_dir=context.options.cache_dir,
                device=context.device,
                progress=context.progress,
            )
        except UserInputError as reason:
            raise MetricUnavailable(f"no Fashion-MNIST classifier: {reason}") from reason

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        images = row.images
        splits = context.options.inception_score_splits
        return {
            "class_accuracy": class_accuracy(images.paths, images.prompts, self.judge),
            "in_domain_is": in_domain_inception_score(
                images.paths, self.judge, splits=splits, seed=context.generation.seed
            ),
        }

    def settings(self) -> dict[str, Any]:
        if self.judge is None:
            return {}
        judge = self.judge
        return {
            "fashion_classifier": {
                "key": judge.key,
                "test_accuracy": judge.test_accuracy,
                **dataclasses.asdict(judge.settings),
            }
        }

    def notes(self, context: EvalContext) -> list[str]:
        if self.judge is None:
            return []
        return [
            "In-domain metrics (class acc., IS (in-domain)) are judged by a Fashion-MNIST "
            f"classifier, a {self.judge.describe()}: class acc. is the share of images it labels "
            "as their prompt's class (real test images score its test accuracy); IS (in-domain) "
            "is the Inception Score formula on its 10 logits (1 to 10). They measure the offline "
            "world's own classes and stand beside CLIP and the Inception IS, not in their place."
        ]
