"""Output knowledge distillation ("soft labels"): the student regresses the teacher's prediction.

Used by small-stable-diffusion stages 2-3 and BK-SDM (Kim et al. 2023, arXiv 2305.15798, Eq. 2):
L_outKD = MSE(ε_S, ε_T). The teacher is a fixed target, so it is detached here as well as run
under no-grad by the engine: no gradient may ever reach it.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn


class OutputKDLoss(nn.Module):
    """MSE between student and (detached) teacher predictions, both (B, C, H, W), in fp32."""

    name: ClassVar[str] = "output_kd"
    uses_teacher: ClassVar[bool] = True
    uses_features: ClassVar[bool] = False

    def forward(self, student_pred: Tensor, teacher_pred: Tensor) -> dict[str, Tensor]:
        return {"output_kd": F.mse_loss(student_pred.float(), teacher_pred.detach().float())}
