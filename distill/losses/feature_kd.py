"""Feature knowledge distillation (BK-SDM, Kim et al. 2023, arXiv 2305.15798, Eq. 3).

L_featKD = Σ_l MSE(f_S^l, f_T^l) over paired stage outputs (e.g. student `down_blocks.0` with
teacher `down_blocks.0`). Paired features must have the same shape; for layers of different widths
use the similarity loss instead.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from distill.losses.base import FeatureLoss, LossOptions, MSEPairOptions, Shape, pair_mse


class FeatureKDLoss(FeatureLoss):
    """Σ over layer pairs of MSE(student feature, teacher feature), reduced in fp32."""

    name: ClassVar[str] = "feature_kd"
    Options: ClassVar[type[LossOptions]] = MSEPairOptions

    def __init__(self, weight: float = 1.0, layer_pairs=(), normalize: str = "none") -> None:
        super().__init__(weight, layer_pairs)
        self.normalize = normalize

    def shape_error(self, student: Shape, teacher: Shape) -> str | None:
        if student != teacher:
            return "shapes differ; pair layers of equal shape or use the similarity loss"
        return None

    def pair_term(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pair_mse(student, teacher, self.normalize)
