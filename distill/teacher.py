"""Teachers: Stable Diffusion pipelines loaded once, and a frozen UNet wrapper that stays frozen.

A stage teacher is used only for its UNet's predictions and features. The wrapper keeps three
invariants in code rather than in the trainer's discipline: it is always in eval mode (an
overridden `train()` ignores the request), its parameters never require grad, and its forward runs
under `torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from torch import nn

from core.errors import UserInputError
from core.families import Conditioning, ModelFamily, resolve


@dataclass
class PipelineComponents:
    """The teacher pipeline the engine uses (any family), loaded from one folder or hub id."""

    source: str
    pipeline: DiffusionPipeline
    family: ModelFamily

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    def conditioning(
        self,
        *,
        encoders: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Conditioning:
        """The family's conditioning: tokenizers only for the cache; with `encoders`, its text
        encoders frozen (eval, no grad), on `device` and in `dtype` (None: as loaded), for the
        step. A frozen encoder held in the compute dtype of a bf16 run costs half its fp32
        memory (SD v1's CLIP ViT-L: 246 MB instead of 492 MB) and no cast per step."""
        if encoders and device is not None:
            for name, module in self.pipeline.components.items():
                if name.startswith("text_encoder") and module is not None:
                    module.to(device, dtype).eval().requires_grad_(False)
        return self.family.conditioning(self.pipeline, encoders=encoders)

    def training_scheduler(self) -> DDPMScheduler:
        """The forward-noising process the teacher was trained with (betas, prediction type)."""
        return DDPMScheduler.from_config(self.pipeline.scheduler.config)

    def with_unet(self, unet: UNet2DConditionModel) -> DiffusionPipeline:
        """This pipeline around another UNet (the student, or the frozen teacher's)."""
        return self.family.with_unet(self.pipeline, unet)

    def with_parts(self, parts: Mapping[str, Any]) -> PipelineComponents:
        """These components with `parts` (name -> module) in place of their own."""
        if not parts:
            return self
        return replace(self, pipeline=self.family.with_parts(self.pipeline, parts))


def load_pipeline_components(source: str, dtype: torch.dtype | None = None) -> PipelineComponents:
    """The pipeline at `source` (folder or hub id), in `dtype` (None: as stored)."""
    resolved = resolve(source)
    return PipelineComponents(source, resolved.pipeline(dtype), resolved.family)


class FrozenTeacher(nn.Module):
    """A teacher UNet that cannot be trained: eval mode, no grad, fixed dtype."""

    def __init__(self, unet: UNet2DConditionModel, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.unet = (unet if unet.dtype == dtype else unet.to(dtype=dtype)).eval()
        self.unet.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # `model.train()` on a parent (or accelerate's prepare) must not switch dropout/norm
        # statistics back on: the teacher is always evaluated exactly as at inference.
        return super().train(False)

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @torch.no_grad()
    def forward(
        self,
        sample: torch.Tensor,  # (B, C, h, w) noisy latents
        timestep: torch.Tensor,  # (B,)
        **conditioning: Any,  # the UNet's keyword inputs, e.g. encoder_hidden_states (B, L, D)
    ) -> torch.Tensor:
        """The teacher's prediction (B, C, h, w), computed in the teacher's dtype."""
        inputs = {key: _cast(value, self.dtype) for key, value in conditioning.items()}
        return self.unet(sample.to(self.dtype), timestep, **inputs).sample


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside dicts, as SDXL's added_cond_kwargs) in `dtype`."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {key: _cast(inner, dtype) for key, inner in value.items()}
    return value


def check_compatible(
    student: UNet2DConditionModel, teacher: UNet2DConditionModel, name: str
) -> None:
    """A teacher must read the student's inputs and predict the same target space."""
    for key in (
        "in_channels",
        "out_channels",
        "cross_attention_dim",
        "sample_size",
        "addition_embed_type",  # SDXL reads pooled text and size ids, SD 1.x/2.x does not
    ):
        student_value, teacher_value = student.config.get(key), teacher.config.get(key)
        if student_value != teacher_value:
            raise UserInputError(
                f"teacher {name!r} does not match the student: {key} is {teacher_value} "
                f"in the teacher and {student_value} in the student"
            )
