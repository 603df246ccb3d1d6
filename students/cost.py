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

TEXT_SEQUENCE_LENGTH = 77  # CLIP's context length, the encoder_hidden_states length in SD


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dummy_unet_inputs(
    unet: UNet2DConditionModel, batch_size: int = 1, sample_size: int | None = None
) -> dict[str, Any]:
    """Inputs of the right shapes for one forward of `unet`, on its device and dtype.

    SDXL-style UNets (`addition_embed_type="text_time"`) also need pooled text embeddings and the
    six micro-conditioning time ids, whose widths follow from the config.
    """
    config = unet.config
    device, dtype = unet.device, unet.dtype
    size = sample_size or config.sample_size
    cross_dim = config.cross_attention_dim
    cross_dim = cross_dim[0] if isinstance(cross_dim, list | tuple) else cross_dim
    inputs: dict[str, Any] = {
        "sample": torch.randn(
            batch_size, config.in_channels, size, size, device=device, dtype=dtype
        ),
        "timestep": torch.full((batch_size,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.randn(
            batch_size, TEXT_SEQUENCE_LENGTH, cross_dim, device=device, dtype=dtype
        ),
    }
    if config.addition_embed_type == "text_time":
        n_time_ids = 6  # original size (2), crop top-left (2), target size (2)
        text_dim = config.projection_class_embeddings_input_dim - (
            n_time_ids * config.addition_time_embed_dim
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch_size, text_dim, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch_size, n_time_ids, device=device, dtype=dtype),
        }
    return inputs


@torch.no_grad()
def forward_gflops(unet: UNet2DConditionModel, batch_size: int = 1) -> float:
    """GFLOPs of one UNet forward at its native latent size (SD v1.4: 64x64 -> 803.3)."""
    inputs = dummy_unet_inputs(unet, batch_size)
    with FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return counter.get_total_flops() / 1e9
