"""Similarity-based layer matching (after Lu et al. 2022, arXiv 2206.14366; OFA-Compress `nst`).

Per sample, a feature map is flattened to H ∈ R^{N×C} (N positions, C channels) and compared
through its position-by-position similarity G = H·Hᵀ / C ∈ R^{N×N}. G has no channel axis, so a
student layer of width 320 can match a teacher layer of width 640: L = Σ_l MSE(G_S^l, G_T^l).

G grows with N²: at 64×64 latents N = 4096 and G is 64 MB per sample in fp32. The maps are first
adaptive-average-pooled so that N ≤ max_positions (default 256, i.e. 16×16).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distill.losses.base import FeatureLoss, LossOptions, MSEPairOptions, Shape, pair_mse
from distill.precision import at_least_fp32


def pooled_grid_size(height: int, width: int, max_positions: int) -> tuple[int, int]:
    """The largest (h, w) ≤ (height, width) with h·w ≤ max_positions, keeping the aspect ratio.

    64×64 with a cap of 256 gives 16×16; maps already within the cap keep their size.
    """
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if height * width <= max_positions:
        return height, width
    scale = math.sqrt(max_positions / (height * width))
    # The small epsilon keeps e.g. 64 * 0.25 from flooring to 15 through float rounding.
    pooled_height = max(1, min(height, max_positions, math.floor(height * scale + 1e-6)))
    pooled_width = max(1, min(width, max_positions // pooled_height))
    return pooled_height, pooled_width


def pooled_positions(shape: Shape, max_positions: int) -> Shape | None:
    """(B, *grid) of the tokens `pooled_tokens` makes from features of `shape`; None when the
    shape is neither (B, C, H, W) nor (B, N, C). Two features pair when these agree."""
    if len(shape) == 4:
        return (shape[0], *pooled_grid_size(shape[2], shape[3], max_positions))
    if len(shape) == 3:
        batch, positions = shape[0], shape[1]
        if positions <= max_positions:
            return (batch, positions)
        side = math.isqrt(positions)
        if side * side == positions:
            return (batch, *pooled_grid_size(side, side, max_positions))
        return (batch, max_positions)
    return None


def pooled_tokens(features: Tensor, max_positions: int) -> Tensor:
    """Features as tokens (B, N, C) with N ≤ max_positions, average-pooled over positions.

    (B, C, H, W) maps are pooled on their 2-D grid. (B, N, C) token sequences (attention inputs and
    outputs in diffusers are raster-ordered H·W tokens) are pooled on a square √N×√N grid when N is
    a perfect square, else with a 1-D pool along the sequence (neighbours in raster order).
    """
    if features.dim() == 4:
        height, width = features.shape[-2:]
        grid = pooled_grid_size(height, width, max_positions)
        if grid != (height, width):
            features = F.adaptive_avg_pool2d(features, grid)
        return features.flatten(2).transpose(1, 2)  # (B, N, C)
    if features.dim() == 3:
        batch, positions, channels = features.shape
        if positions <= max_positions:
            return features
        side = math.isqrt(positions)
        if side * side == positions:
            grid_map = features.transpose(1, 2).reshape(batch, channels, side, side)
            return pooled_tokens(grid_map, max_positions)
        pooled = F.adaptive_avg_pool1d(features.transpose(1, 2), max_positions)  # (B, C, N')
        return pooled.transpose(1, 2)
    raise ValueError(
        f"expected features of shape (B, C, H, W) or (B, N, C), got {tuple(features.shape)}"
    )


def similarity_matrix(features: Tensor, max_positions: int) -> Tensor:
    """G = H·Hᵀ / C per sample, shape (B, N, N), fp32; features (B, C, H, W) or (B, N, C).

    Computed in fp32 with autocast off, because under bf16 autocast the matmul would run in bf16:
    bf16 keeps 8 significant bits (relative rounding ≈ 0.4%), each entry of G is a sum over C
    products, and the loss is the difference of two such matrices: once the student is close to
    the teacher, that difference is as small as the rounding and the gradient becomes noise.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        tokens = pooled_tokens(at_least_fp32(features), max_positions)  # (B, N, C)
        return torch.bmm(tokens, tokens.transpose(1, 2)) / tokens.shape[-1]  # (B, N, N)


class SimilarityOptions(MSEPairOptions):
    max_positions: Annotated[int, Field(gt=0)] = 256  # N cap before G = H·Hᵀ / C (16×16)


class SimilarityMatchingLoss(FeatureLoss):
    """Σ over layer pairs of MSE(G_S, G_T); student and teacher widths may differ."""

    name: ClassVar[str] = "similarity"
    Options: ClassVar[type[LossOptions]] = SimilarityOptions

    def __init__(
        self,
        weight: float = 1.0,
        layer_pairs=(),
        max_positions: int = 256,
        normalize: str = "none",
    ) -> None:
        super().__init__(weight, layer_pairs)
        self.max_positions = max_positions
        self.normalize = normalize

    def shape_error(self, student: Shape, teacher: Shape) -> str | None:
        student_grid = pooled_positions(student, self.max_positions)
        teacher_grid = pooled_positions(teacher, self.max_positions)
        if student_grid is None or teacher_grid is None:
            return "expected (B, C, H, W) maps or (B, N, C) tokens"
        if student_grid != teacher_grid:
            return "paired layers need the same batch and spatial size"
        return None

    def pair_term(self, student: Tensor, teacher: Tensor) -> Tensor:
        student_gram = similarity_matrix(student, self.max_positions)
        teacher_gram = similarity_matrix(teacher, self.max_positions)
        return pair_mse(student_gram, teacher_gram, self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_positions={self.max_positions}"
