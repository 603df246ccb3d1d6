"""Step records for loss tests: `StepOutputs` built from just the fields a test cares about."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from distill.losses import StepOutputs


def step_outputs(
    *,
    student_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    teacher_pred: torch.Tensor | None = None,
    student_features: Mapping[str, torch.Tensor] | None = None,
    teacher_features: Mapping[str, torch.Tensor] | None = None,
) -> StepOutputs:
    """A record whose unspecified predictions are empty tensors and features empty dicts."""
    empty = torch.zeros(0)
    return StepOutputs(
        student_pred=empty if student_pred is None else student_pred,
        target=empty if target is None else target,
        teacher_pred=teacher_pred,
        student_features=dict(student_features or {}),
        teacher_features=dict(teacher_features or {}),
        timesteps=torch.zeros(0, dtype=torch.long),
    )


def features(
    student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]
) -> StepOutputs:
    return step_outputs(student_features=student, teacher_features=teacher)
