"""The task (denoising) loss: the student regresses the scheduler's training target.

Which target depends on the noise scheduler's `prediction_type`: SD v1.x predicts the noise ε,
SD 2.x-v predicts the velocity v (Salimans & Ho 2022, "Progressive Distillation", arXiv 2202.00512,
Sec. 4; diffusers `DDPMScheduler.get_velocity`). The step builds the target (`task_target`); the
loss only reads it.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from core.errors import UserInputError
from distill.losses.base import Loss, StepOutputs
from distill.precision import at_least_fp32

PREDICTION_TYPES = ("epsilon", "v_prediction")


def task_target(
    prediction_type: str,
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
) -> Tensor:
    """The regression target for a noised batch.

    latents: clean latents x0, (B, C, H, W); noise: ε, same shape; timesteps: (B,) integer steps;
    alphas_cumprod: (T,) the scheduler's ᾱ table. Returns ε for "epsilon" and
    v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0 for "v_prediction", in the latents' dtype.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha_bar = alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[
            timesteps.to(latents.device)
        ]
        # (B,) -> (B, 1, 1, 1): one ᾱ per sample, broadcast over its latent.
        alpha_bar = alpha_bar.reshape(-1, *([1] * (latents.dim() - 1)))
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    raise UserInputError(
        f"unknown prediction_type {prediction_type!r}; "
        f"expected one of {', '.join(PREDICTION_TYPES)}"
    )


class TaskLoss(Loss):
    """MSE between the student's prediction and the scheduler target, reduced in fp32."""

    name: ClassVar[str] = "task"
    reads_teacher: ClassVar[bool] = False

    def forward(self, outputs: StepOutputs) -> dict[str, Tensor]:
        # Reduce in fp32: a mean of many small squared errors loses digits in bf16.
        return {
            "task": F.mse_loss(at_least_fp32(outputs.student_pred), at_least_fp32(outputs.target))
        }
