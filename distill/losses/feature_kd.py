"""Feature knowledge distillation (BK-SDM, Kim et al. 2023, arXiv 2305.15798, Eq. 3).

L_featKD = Σ_l MSE(f_S^l, f_T^l) over paired stage outputs (e.g. student `down_blocks.0` with
teacher `down_blocks.0`). Paired features must have the same shape; for layers of different widths
use the similarity loss instead. Features come from `distill.taps.FeatureTaps`, keyed by module
path; `feature_pairs` is the pairing step shared by every feature-level loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UserInputError


def feature_pairs(
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    pairs: Sequence[tuple[str, str]],
    loss_name: str,
) -> Iterator[tuple[tuple[str, str], Tensor, Tensor]]:
    """Yield ((student_path, teacher_path), student_feature, detached teacher_feature) per pair.

    No pairs is a configuration error (the loss would silently be zero); a path with no captured
    feature is a wiring error (the path was not tapped, or its module did not run).
    """
    if not pairs:
        raise UserInputError(f"{loss_name} needs at least one (student, teacher) layer pair")
    for student_path, teacher_path in pairs:
        for side, path, feats in (
            ("student", student_path, student_feats),
            ("teacher", teacher_path, teacher_feats),
        ):
            if path not in feats:
                raise KeyError(
                    f"{loss_name}: no {side} feature captured for {path!r} "
                    f"(captured: {', '.join(sorted(feats)) or 'none'})"
                )
        yield (
            (student_path, teacher_path),
            student_feats[student_path],
            teacher_feats[teacher_path].detach(),
        )


class FeatureKDLoss(nn.Module):
    """Σ over layer pairs of MSE(student feature, teacher feature), reduced in fp32."""

    name: ClassVar[str] = "feature_kd"
    uses_teacher: ClassVar[bool] = True
    uses_features: ClassVar[bool] = True

    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        pairs: Sequence[tuple[str, str]],
    ) -> dict[str, Tensor]:
        total = None
        for pair, student, teacher in feature_pairs(student_feats, teacher_feats, pairs, self.name):
            if student.shape != teacher.shape:
                raise UserInputError(
                    f"feature_kd pair {pair}: student shape {tuple(student.shape)} != teacher "
                    f"shape {tuple(teacher.shape)}; pair layers of equal shape or use the "
                    f"similarity loss"
                )
            term = F.mse_loss(student.float(), teacher.float())
            total = term if total is None else total + term
        return {"feature_kd": total}
