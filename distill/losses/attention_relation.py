"""Attention-relation matching (MiniLMv2, Wang et al. 2021, arXiv 2012.15828, Sec. 3.1).

The query (or key, or value) vectors of a self-attention, (B, N, C), are split into a fixed number
R of relation heads of width d_r = C / R; each head's relation is the row-wise distribution
softmax(Q_r·Q_rᵀ / √d_r) over the N positions, (B, R, N, N). The loss is KL(teacher ‖ student),
summed over each row's distribution and averaged over batch, heads and rows. Because R is fixed
(not the models' own head counts), teacher and student widths may differ.

Which module outputs to tap: the projections of a diffusers self-attention, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` (or `.to_k` / `.to_v`). Only `attn1`
is self-attention; `attn2` projects its keys/values from the text. The default pairs are the Q, K
and V projections of every self-attention the student kept, each with the teacher attention it was
initialized from (MiniLMv2 matches Q-Q, K-K and V-V relations). Fused projections
(`fuse_qkv_projections`) bypass `to_q`, so tap unfused models.

Relations cost R·N² per sample, so tokens are first pooled to N ≤ max_positions on their grid
(see `distill.losses.similarity.pooled_tokens`).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from core.errors import UserInputError
from distill.losses.base import (
    Config,
    FeatureLoss,
    FeatureLossOptions,
    LayerPair,
    LossOptions,
    Shape,
)
from distill.losses.similarity import pooled_positions, pooled_tokens
from distill.precision import at_least_fp32
from students import self_attention_pairs

PROJECTIONS = ("to_q", "to_k", "to_v")


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
        heads = at_least_fp32(tokens).reshape(batch, positions, relation_heads, head_width)
        heads = heads.transpose(1, 2)  # (B, R, N, d_r)
        scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_width)  # (B, R, N, N)
        return scores.log_softmax(dim=-1)


def relation_kl(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(teacher ‖ student) of row distributions (..., N), summed per row, mean over rows."""
    teacher_probs = teacher_log_probs.exp()
    return (teacher_probs * (teacher_log_probs - student_log_probs)).sum(dim=-1).mean()


class AttentionRelationOptions(FeatureLossOptions):
    relation_heads: Annotated[int, Field(gt=0)] = 8
    max_positions: Annotated[int, Field(gt=0)] = 256


class AttentionRelationLoss(FeatureLoss):
    """Σ over layer pairs of KL(teacher relations ‖ student relations); inputs (B, N, C)."""

    name: ClassVar[str] = "attention_relation"
    Options: ClassVar[type[LossOptions]] = AttentionRelationOptions

    def __init__(
        self,
        weight: float = 1.0,
        layer_pairs=(),
        relation_heads: int = 8,
        max_positions: int = 256,
    ) -> None:
        super().__init__(weight, layer_pairs)
        self.relation_heads = relation_heads
        self.max_positions = max_positions

    @classmethod
    def default_pairs(cls, student: Config, teacher: Config) -> list[LayerPair]:
        """Q, K and V of every self-attention the student kept, each with its init source."""
        pairs = [self_attention_pairs(student, teacher, p) for p in PROJECTIONS]
        return [pair for projection_pairs in pairs for pair in projection_pairs]

    def shape_error(self, student: Shape, teacher: Shape) -> str | None:
        if len(student) != 3 or len(teacher) != 3:
            return "expected (B, N, C) attention projections (e.g. '...attn1.to_q')"
        if pooled_positions(student, self.max_positions) != pooled_positions(
            teacher, self.max_positions
        ):
            return "student and teacher differ in batch or number of positions"
        if student[-1] % self.relation_heads or teacher[-1] % self.relation_heads:
            return f"widths must be divisible by relation_heads={self.relation_heads}"
        return None

    def pair_term(self, student: Tensor, teacher: Tensor) -> Tensor:
        student_tokens = pooled_tokens(at_least_fp32(student), self.max_positions)
        teacher_tokens = pooled_tokens(at_least_fp32(teacher), self.max_positions)
        return relation_kl(
            attention_relation_log_probs(teacher_tokens, self.relation_heads),
            attention_relation_log_probs(student_tokens, self.relation_heads),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, relation_heads={self.relation_heads}, "
            f"max_positions={self.max_positions}"
        )
