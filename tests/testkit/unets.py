"""Tiny real UNets with the Stable Diffusion block layout (seeded)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from offline.tiny_models import sd_v1_4_toy_config

# SD v1.x's layout in miniature: cross-attention in every stage but the deepest, two layers per
# block, so the student builder's pruning applies exactly as it does to SD v1.4.
TINY_SD_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}


def make_tiny_teacher(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_SD_UNET_CONFIG, **overrides}).eval()


def make_tiny_sd_v1_4(seed: int = 0) -> UNet2DConditionModel:
    """SD v1.4's UNet config at toy widths (`offline.tiny_models`), seeded."""
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(sd_v1_4_toy_config())
