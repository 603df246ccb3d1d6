"""Model size and compute: parameter counts and forward FLOPs of a UNet.

FLOPs come from `torch.utils.flop_counter` (matmuls and convolutions, 2 FLOPs per multiply-add),
counted on one forward at the UNet's native latent size. It runs on the meta device too, so the cost
of SDXL is known without allocating its weights.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from core.families import family_for


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def transformer_depths(unet: torch.nn.Module) -> dict[str, Any]:
    """Transformer layers per block, as the UNet holds them: `{"down_blocks": [...], "mid_block":
    n or None, "up_blocks": [...]}`, 0 for a block without attention (SDXL base: [0, 2, 10], 10,
    [10, 2, 0]). Read from the modules, so it describes the built student, not its intent."""

    def depth(block: torch.nn.Module | None) -> int | None:
        if block is None:
            return None
        attentions = getattr(block, "attentions", None)
        if not attentions:
            return 0
        return len(attentions[0].transformer_blocks)

    return {
        "down_blocks": [depth(b) for b in unet.down_blocks],
        "mid_block": depth(unet.mid_block),
        "up_blocks": [depth(b) for b in unet.up_blocks],
    }


def dummy_unet_inputs(
    unet: UNet2DConditionModel, batch_size: int = 1, sample_size: int | None = None
) -> dict[str, Any]:
    """Inputs of the right shapes for one forward of `unet`, on its device and dtype, as its
    model family defines them (SDXL-style UNets also take pooled text and size ids)."""
    family = family_for(None, dict(unet.config))
    return family.probe_inputs(
        unet.config,
        batch_size=batch_size,
        sample_size=sample_size,
        device=unet.device,
        dtype=unet.dtype,
    )


@torch.no_grad()
def forward_gflops(unet: UNet2DConditionModel, batch_size: int = 1) -> float:
    """GFLOPs of one UNet forward at its native latent size (SD v1.4: 64x64 -> 803.3)."""
    inputs = dummy_unet_inputs(unet, batch_size)
    with FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return counter.get_total_flops() / 1e9
