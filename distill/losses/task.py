"""The task (denoising) loss: the student regresses the scheduler's training target.

Which target depends on the noise scheduler's `prediction_type`: SD v1.x predicts the noise ε,
SD 2.x-v predicts the velocity v (Salimans & Ho 2022, "Progressive Distillation", arXiv 2202.00512,
Sec. 4; diffusers `DDPMScheduler.get_velocity`). The step builds the target (`task_target`); the
loss only reads it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from core.errors import UserInputError
from distill.losses.base import Loss, LossOptions, StepOutputs
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


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str = "epsilon") -> Tensor:
    """Per-sample loss weights, min(SNR, γ) / SNR for ε and min(SNR, γ) / (SNR + 1) for v.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (eq. 9 with
    the loss's implicit SNR weight divided out: SNR for ε, SNR + 1 for v): low-noise steps,
    which dominate the loss but teach little, are down-weighted.
    """
    clamped = torch.clamp(snr, max=gamma)
    return clamped / (snr + 1) if prediction_type == "v_prediction" else clamped / snr


class TaskOptions(LossOptions):
    # Min-SNR-γ weighting of each sample (Hang et al. 2023; γ = 5 in the paper); None: the plain
    # mean. For training a UNet from scratch (the offline teachers); distillation runs use None.
    min_snr_gamma: Annotated[float, Field(gt=0.0)] | None = None


class TaskLoss(Loss):
    """MSE between the student's prediction and the scheduler target, reduced in fp32."""

    name: ClassVar[str] = "task"
    Options: ClassVar[type[LossOptions]] = TaskOptions
    reads_teacher: ClassVar[bool] = False

    def __init__(self, weight: float = 1.0, min_snr_gamma: float | None = None) -> None:
        super().__init__(weight)
        self.min_snr_gamma = min_snr_gamma

    def forward(self, outputs: StepOutputs) -> dict[str, Tensor]:
        # Reduce in fp32: a mean of many small squared errors loses digits in bf16.
        student, target = at_least_fp32(outputs.student_pred), at_least_fp32(outputs.target)
        if self.min_snr_gamma is None:
            return {"task": F.mse_loss(student, target)}
        per_sample = (student - target).pow(2).flatten(1).mean(1)  # (B,)
        weights = min_snr_weights(outputs.snr, self.min_snr_gamma, outputs.prediction_type)
        return {"task": (per_sample * weights.to(per_sample.dtype)).mean()}

    def extra_repr(self) -> str:
        gamma = f", min_snr_gamma={self.min_snr_gamma:g}" if self.min_snr_gamma else ""
        return super().extra_repr() + gamma
