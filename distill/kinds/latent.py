"""The common part of kinds that train a UNet on the latent cache: the noised micro-batch and the
teacher-beside-student grid.

A micro-batch is the cache's rows (posterior mean and std, caption fields) and their stream
positions; `noisy` draws each sample's latent, noise, timestep and caption dropout from the
generator of (seed, stage, position) and runs the frozen text encoders on the result, so a kind's
step sees the UNet's own inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from diffusers import UNet2DConditionModel
from torch import nn

from distill.kinds.base import StageKind, StageRows, StageSetup, ValidationSettings
from distill.step import NoisyBatch, noise_batch
from distill.step_randomness import sample_generator
from distill.validation import GridRow, save_validation_grid


class LatentStageKind(StageKind):
    """A kind whose rows are the latent cache and whose network is the student UNet."""

    reads_latents: ClassVar[bool] = True

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        self.cache = setup.data.latents()
        self.conditioning = setup.components.conditioning(
            encoders=True, device=setup.device, dtype=setup.precision.compute
        )
        self.noise_scheduler = setup.components.training_scheduler()

    @property
    def rows(self) -> StageRows:
        return self.cache

    def noisy(self, batch: Mapping[str, Any]) -> NoisyBatch:
        """The micro-batch after the forward process, with encoded conditioning."""
        setup = self.setup
        noisy = noise_batch(
            batch["latent_mean"],
            batch["latent_std"],
            batch["conditioning"],
            self.cache.empty_conditioning,
            [sample_generator(setup.seed, setup.index, int(p)) for p in batch["positions"]],
            scheduler=self.noise_scheduler,
            scaling_factor=self.cache.scaling_factor,
            shift_factor=self.cache.shift_factor,
            uncond_prob=setup.uncond_prob,
            device=setup.device,
            dtype=setup.precision.weights,
        )
        return replace(noisy, conditioning=self.conditioning.encode(noisy.conditioning))

    def sample_grid(
        self, model: nn.Module, path: Path, settings: ValidationSettings
    ) -> Path | None:
        """The stage teacher's row (if any) above the student's, same prompts and seeds; each
        row sampled as its model samples (`grid_rows`)."""
        if not settings.prompts or not isinstance(model, UNet2DConditionModel):
            return None
        return save_validation_grid(
            self.grid_rows(model, settings),
            settings.prompts,
            path,
            seed=settings.seed,
            device=self.setup.device,
        )

    def grid_rows(self, model: UNet2DConditionModel, settings: ValidationSettings) -> dict:
        components, rows = self.setup.components, {}
        teacher = self.setup.teacher
        if teacher is not None:
            rows[f"teacher {self.setup.teacher_key}"] = GridRow(
                components.with_unet(teacher.unet), settings.steps, settings.guidance
            )
        student = self.sampling(components.with_unet(model), self.setup.options)
        rows["student"] = GridRow(student, settings.steps, settings.guidance)
        return rows
