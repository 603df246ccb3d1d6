"""One distillation loss computation: student and teacher on the same noisy latents.

Kept apart from the trainer (which owns data, randomness and the optimizer) so that the same code
is what the SD-scale benchmark times and what the tests exercise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from distill.losses import needs_feature_taps, weighted_total
from distill.taps import FeatureTaps
from distill.teacher import FrozenTeacher


@dataclass(frozen=True)
class NoisyBatch:
    noisy: torch.Tensor  # (B, 4, h, w) latents after the forward process at `timesteps`
    timesteps: torch.Tensor  # (B,)
    text: torch.Tensor  # (B, 77, D) text-encoder hidden states (empty prompt where dropped)
    target: torch.Tensor  # (B, 4, h, w) ε or v, per the scheduler's prediction type


def distillation_losses(
    student: nn.Module,
    teacher: FrozenTeacher | None,
    batch: NoisyBatch,
    losses: Sequence[nn.Module],
    weights: Mapping[str, float],
    layer_pairs: Sequence[tuple[str, str]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total, raw terms). Run it under the run's autocast; the teacher is frozen."""
    with feature_taps(student, teacher, layer_pairs, enabled=needs_feature_taps(weights)) as taps:
        student_pred = student(batch.noisy, batch.timesteps, batch.text).sample
        teacher_pred = teacher(batch.noisy, batch.timesteps, batch.text) if teacher else None
        terms: dict[str, torch.Tensor] = {}
        for loss in losses:
            # Predictions in fp32 for the losses: bf16 MSE of near-equal tensors loses the signal.
            if loss.name == "task":
                terms |= loss(student_pred.float(), batch.target.float())
            elif loss.name == "output_kd":
                terms |= loss(student_pred.float(), teacher_pred.float())
            else:
                student_taps, teacher_taps = taps
                terms |= loss(student_taps.features, teacher_taps.features, layer_pairs)
    return weighted_total(terms, weights), terms


@contextmanager
def feature_taps(
    student: nn.Module,
    teacher: FrozenTeacher | None,
    layer_pairs: Sequence[tuple[str, str]],
    enabled: bool,
) -> Iterator[tuple[FeatureTaps, FeatureTaps] | None]:
    """Taps on both models for the feature losses, or nothing when no loss reads features."""
    if not enabled:
        yield None
        return
    if teacher is None:
        raise ValueError("feature losses need a teacher")
    with (
        FeatureTaps(student, [s for s, _ in layer_pairs]) as student_taps,
        FeatureTaps(teacher.unet, [t for _, t in layer_pairs], detach=True) as teacher_taps,
    ):
        yield student_taps, teacher_taps
