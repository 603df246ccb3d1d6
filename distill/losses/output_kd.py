"""Output knowledge distillation ("soft labels"): the student regresses the teacher's prediction.

Used by small-stable-diffusion stages 2-3 and BK-SDM (Kim et al. 2023, arXiv 2305.15798, Eq. 2):
L_outKD = MSE(ε_S, ε_T). The teacher is a fixed target, so it is detached here as well as run
under no-grad by the engine: no gradient may ever reach it.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import Loss, StepOutputs
from distill.precision import at_least_fp32


class OutputKDLoss(Loss):
    """MSE between student and (detached) teacher predictions, both (B, C, H, W), in fp32."""

    name: ClassVar[str] = "output_kd"

    def forward(self, outputs: StepOutputs) -> dict[str, Tensor]:
        if outputs.teacher_pred is None:
            raise ValueError("output_kd needs the teacher's prediction; the stage has no teacher")
        teacher = at_least_fp32(outputs.teacher_pred.detach())
        return {"output_kd": F.mse_loss(at_least_fp32(outputs.student_pred), teacher)}
