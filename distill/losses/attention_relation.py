"""Attention-relation matching (MiniLMv2, Wang et al. 2021, arXiv 2012.15828, Sec. 3.1).

The query (or key, or value) vectors of a self-attention, (B, N, C), are split into a fixed number
R of relation heads of width d_r = C / R; each head's relation is the row-wise distribution
softmax(Q_r·Q_rᵀ / √d_r) over the N positions, (B, R, N, N). The loss is KL(teacher ‖ student),
summed over each row's distribution and averaged over batch, heads and rows. Because R is fixed
(not the models' own head counts), teacher and student widths may differ.

Which module outputs to tap: the projections of a diffusers self-attention, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` (or `.to_k` / `.to_v`). Only `attn1`
is self-attention; `attn2` projects its keys/values from the text. Fused projections
(`fuse_qkv_projections`) bypass `to_q`, so tap unfused models.

Relations cost R·N² per sample, so tokens are first pooled to N ≤ max_positions on their grid
(see `distill.losses.similarity.pooled_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from distill.errors import UserInputError
from distill.losses.feature_kd import feature_pairs
from distill.losses.similarity import pooled_tokens


def attention_relation_log_probs(tokens: Tensor, relation_heads: int) -> Tensor:
    """log softmax(Q_r·Q_rᵀ / √d_r) per relation head: tokens (B, N, C) → (B, R, N, N), fp32.

    fp32 with autocast off for the same reason as the similarity matrix: the loss compares two
    nearly equal distributions.
    """
    batch, positions, channels = tokens.shape
    if channels % relation_heads:
        raise UserInputError(
            f"attention_relation: width {channels} is not divisible by relation_heads "
            f"{relation_heads}"
        )
    head_width = channels // relation_heads
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        heads = tokens.float().reshape(batch, positions, relation_heads, head_width)
        heads = heads.transpose(1, 2)  # (B, R, N, d_r)
        scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_width)  # (B, R, N, N)
        return scores.log_softmax(dim=-1)


def relation_kl(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(teacher ‖ student) of row distributions (..., N), summed per row, mean over rows."""
    teacher_probs = teacher_log_probs.exp()
    return (teacher_probs * (teacher_log_probs - student_log_probs)).sum(dim=-1).mean()


class AttentionRelationLoss(nn.Module):
    """Σ over layer pairs of KL(teacher relations ‖ student relations); inputs (B, N, C)."""

    name: ClassVar[str] = "attention_relation"
    uses_teacher: ClassVar[bool] = True
    uses_features: ClassVar[bool] = True

    def __init__(self, relation_heads: int = 8, max_positions: int = 256) -> None:
        super().__init__()
        for option, value in (("relation_heads", relation_heads), ("max_positions", max_positions)):
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"{option} must be a positive integer, got {value!r}")
        self.relation_heads = relation_heads
        self.max_positions = max_positions

    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        pairs: Sequence[tuple[str, str]],
    ) -> dict[str, Tensor]:
        total = None
        for pair, student, teacher in feature_pairs(student_feats, teacher_feats, pairs, self.name):
            if student.dim() != 3 or teacher.dim() != 3:
                raise UserInputError(
                    f"attention_relation pair {pair}: expected (B, N, C) attention projections "
                    f"(e.g. '...attn1.to_q'), got student {tuple(student.shape)}, teacher "
                    f"{tuple(teacher.shape)}"
                )
            student_tokens = pooled_tokens(student.float(), self.max_positions)
            teacher_tokens = pooled_tokens(teacher.float(), self.max_positions)
            if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
                raise UserInputError(
                    f"attention_relation pair {pair}: student {tuple(student.shape)} and teacher "
                    f"{tuple(teacher.shape)} differ in batch or number of positions"
                )
            term = relation_kl(
                attention_relation_log_probs(teacher_tokens, self.relation_heads),
                attention_relation_log_probs(student_tokens, self.relation_heads),
            )
            total = term if total is None else total + term
        return {"attention_relation": total}

    def extra_repr(self) -> str:
        return f"relation_heads={self.relation_heads}, max_positions={self.max_positions}"
