"""Feature knowledge distillation (BK-SDM, Kim et al. 2023, arXiv 2305.15798, Eq. 3).

L_featKD = Σ_l MSE(f_S^l, f_T^l) over paired stage outputs (e.g. student `down_blocks.0` with
teacher `down_blocks.0`). Paired features must have the same shape; for layers of different widths
use the similarity loss instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import FeatureLoss, LayerPair, Shape
from students import block_pairs


class FeatureKDLoss(FeatureLoss):
    """Σ over layer pairs of MSE(student feature, teacher feature), reduced in fp32."""

    name: ClassVar[str] = "feature_kd"

    @classmethod
    def default_pairs(
        cls, student_config: Mapping[str, Any], teacher_config: Mapping[str, Any]
    ) -> list[LayerPair]:
        return block_pairs(student_config, teacher_config)  # every stage's output

    def shape_error(self, student: Shape, teacher: Shape) -> str | None:
        if student != teacher:
            return "shapes differ; pair layers of equal shape or use the similarity loss"
        return None

    def pair_term(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(student.float(), teacher.float())
