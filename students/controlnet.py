"""A diffusers ControlNet for any student, mid-block-less ones (BK-SDM-Small, -Tiny) included.

`ControlNetModel.from_unet` copies a UNet's config and encoder weights into a ControlNet. It fails
on a UNet without a mid block (`ValueError: unknown mid_block_type : None`, diffusers 0.42.1;
BK-SDM issue #64, diffusers #8424), because a ControlNet always has one: its mid block's output is
the residual the UNet adds after its deepest stage, which the UNet's forward adds whether or not
it has a mid block of its own. So a student without one gets a ControlNet whose mid block comes
from the teacher when the teacher's fits (same channels, same transformer depth), else fresh
(diffusers' default init), and the report says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

# The mid block a ControlNet gets when the student has none and no teacher says which kind.
DEFAULT_MID_BLOCK = "UNetMidBlock2DCrossAttn"
# diffusers' conditioning embedding: each entry after the first halves the conditioning image, so
# (16, 32, 96, 256) brings a 512 px image to SD's 64×64 latents (VAE scale factor 8).
CONDITIONING_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetInit:
    """Where the ControlNet's mid block came from: "student", "teacher" or "fresh", and why."""

    mid_block: str
    reason: str


def controlnet_from_student(
    student: UNet2DConditionModel,
    teacher: UNet2DConditionModel | None = None,
    *,
    conditioning_channels: int = 3,
    vae_scale_factor: int = 8,
) -> tuple[ControlNetModel, ControlNetInit]:
    """A ControlNet initialised from `student` the way `ControlNetModel.from_unet` does (conv_in,
    time embedding and every down block copied; zero convolutions zero), for any variant. Its
    conditioning image is `vae_scale_factor` times the latent size (8 for SD; the offline
    world's VAE: 4)."""
    downsamplings = vae_scale_factor.bit_length() - 1
    if 1 << downsamplings != vae_scale_factor or downsamplings >= len(CONDITIONING_CHANNELS):
        raise ValueError(f"vae_scale_factor must be 1, 2, 4 or 8, got {vae_scale_factor}")
    options = {
        "conditioning_channels": conditioning_channels,
        "conditioning_embedding_out_channels": CONDITIONING_CHANNELS[: downsamplings + 1],
    }
    if student.mid_block is not None:
        controlnet = ControlNetModel.from_unet(student, **options)
        return controlnet, ControlNetInit("student", "the student's own mid block")
    mid_block_type = (teacher.config.mid_block_type if teacher is not None else None) or (
        DEFAULT_MID_BLOCK
    )
    # A stand-in UNet: the student's config and weights plus a mid block, which from_unet copies.
    # mid_block_type goes in as a keyword: diffusers 0.42's from_config resets keys listed in a
    # loaded config's `_use_default_values` when they come in through the config dict.
    stand_in = UNet2DConditionModel.from_config(student.config, mid_block_type=mid_block_type)
    stand_in = stand_in.to(device=student.device, dtype=student.dtype)
    missing, unexpected = stand_in.load_state_dict(student.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("mid_block.") for key in missing), (
        "the stand-in differs from the student outside its mid block"
    )
    init = _mid_block_from_teacher(stand_in, teacher)
    controlnet = ControlNetModel.from_unet(stand_in, **options)
    return controlnet, init


def _mid_block_from_teacher(
    stand_in: UNet2DConditionModel, teacher: UNet2DConditionModel | None
) -> ControlNetInit:
    if teacher is None or teacher.mid_block is None:
        return ControlNetInit("fresh", "no teacher mid block given")
    source, target = teacher.mid_block.state_dict(), stand_in.mid_block.state_dict()
    if source.keys() != target.keys() or any(
        source[key].shape != target[key].shape for key in target
    ):
        return ControlNetInit(
            "fresh", "the teacher's mid block does not fit the student's deepest stage"
        )
    with torch.no_grad():
        stand_in.mid_block.load_state_dict(source)
    return ControlNetInit("teacher", "the teacher's mid block (same channels and depth)")
