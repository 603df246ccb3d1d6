"""One distillation step's math: noising a cached batch, and the losses of both models on it.

Pure functions in k-diffusion's style, shared by the trainer, the SD-scale benchmark and the tests:

    noise_batch(...)          cached posterior + conditioning + per-sample generators -> NoisyBatch
    distillation_losses(...)  student (and frozen teacher) on a NoisyBatch -> (total, raw terms)

`distillation_losses` never names a loss: it reads the features the losses ask for from the
stage's `StepTaps` (hooks registered once per stage), runs both models once, freezes the result
into a `StepOutputs` record and lets every loss read what it needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from distill.data.cache import sample_latents
from distill.losses import Loss, StepOutputs, task_target, weighted_total
from distill.precision import at_least_fp32
from distill.taps import FeatureTaps
from distill.teacher import FrozenTeacher


@dataclass(frozen=True)
class NoisyBatch:
    noisy: Tensor  # (B, C, h, w) latents after the forward process at `timesteps`
    timesteps: Tensor  # (B,) integer steps
    conditioning: dict[str, Tensor]  # the UNet's keyword inputs, e.g. encoder_hidden_states
    target: Tensor  # (B, C, h, w) ε or v, per the scheduler's prediction type
    snr: Tensor  # (B,) signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at each sample's timestep
    prediction_type: str = "epsilon"


def clean_latents_and_noise(
    latent_mean: Tensor,
    latent_std: Tensor,
    generators: Sequence[torch.Generator],
    scaling_factor: float,
    shift_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The first two draws of every sample's generator, for every stage kind that noises
    latents: a sample of its cached VAE posterior (scaled, z_0) and its noise, each (B, C, h, w)."""
    latents = sample_latents(
        latent_mean.to(dtype),
        latent_std.to(dtype),
        scaling_factor,
        list(generators),
        shift_factor=shift_factor,
    )
    noise = randn_tensor(latents.shape, generator=list(generators), dtype=dtype)
    return latents, noise


def noise_batch(
    latent_mean: Tensor,
    latent_std: Tensor,
    conditioning: Mapping[str, Tensor],
    unconditional: Mapping[str, Tensor],
    generators: Sequence[torch.Generator],
    *,
    scheduler: DDPMScheduler,
    scaling_factor: float,
    shift_factor: float | None = None,
    uncond_prob: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> NoisyBatch:
    """The forward diffusion process on one batch, every draw from the sample's own generator.

    latent_mean, latent_std: (B, C, h, w), the cached VAE posterior (unscaled).
    conditioning: the batch's UNet inputs, each (B, ...); unconditional: the empty prompt's, each
        without the batch axis. A sample dropped for classifier-free guidance (probability
        `uncond_prob`) gets the empty prompt's value for every key in `unconditional`.
    generators: one CPU generator per sample (`distill.step_randomness.sample_generator`), drawn
        in a fixed order: posterior sample, noise, timestep, dropout. The batch is therefore the
        same on any device and for any split of the global batch over processes.
    dtype: of the latents, noise and target (the run's weights dtype, `distill.precision`).
    """
    latents, noise = clean_latents_and_noise(
        latent_mean, latent_std, generators, scaling_factor, shift_factor, dtype
    )
    num_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators])
    drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < uncond_prob  # (B,)
    inputs = dict(conditioning)
    for key, empty in unconditional.items():
        mask = drop.reshape(-1, *([1] * empty.dim()))  # (B, 1, ...): broadcast over the value
        inputs[key] = torch.where(mask, empty[None], inputs[key])

    # non_blocking: from the loader's pinned memory a copy to a GPU overlaps the host's work
    latents, noise, timesteps = (
        t.to(device, non_blocking=True) for t in (latents, noise, timesteps)
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type
    target = task_target(prediction_type, latents, noise, timesteps, alphas_cumprod)
    alpha_bar = alphas_cumprod[timesteps].to(dtype)  # (B,)
    return NoisyBatch(
        noisy,
        timesteps,
        {k: v.to(device, non_blocking=True) for k, v in inputs.items()},
        target,
        snr=alpha_bar / (1 - alpha_bar),
        prediction_type=prediction_type,
    )


def tapped_paths(losses: Sequence[Loss]) -> tuple[list[str], list[str]]:
    """(student paths, teacher paths) that `losses` read features from, in loss order."""
    student = [path for loss in losses for path in loss.tapped_paths()[0]]
    teacher = [path for loss in losses for path in loss.tapped_paths()[1]]
    return student, teacher


class StepTaps:
    """The feature taps a set of losses reads, on the student and the frozen teacher: registered
    once for a stage (entered), cleared around every step, removed on exit. Registering hooks
    per step would make a compiled step recompile."""

    def __init__(
        self, student: nn.Module, teacher: FrozenTeacher | None, losses: Sequence[Loss]
    ) -> None:
        student_paths, teacher_paths = tapped_paths(losses)
        self.student = FeatureTaps(student, student_paths)
        self.teacher = None
        if teacher is not None and any(loss.reads_teacher for loss in losses):
            self.teacher = FeatureTaps(teacher.unet, teacher_paths, detach=True)
        self._stack = ExitStack()

    def __enter__(self) -> StepTaps:
        for taps in (self.student, self.teacher):
            if taps is not None:
                self._stack.enter_context(taps)
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
        self._stack.close()

    def clear(self) -> None:
        """Drop the captured features (and with them references into the last step's graph)."""
        for taps in (self.student, self.teacher):
            if taps is not None:
                taps.clear()


def distillation_losses(
    student: nn.Module,
    teacher: FrozenTeacher | None,
    batch: NoisyBatch,
    losses: Sequence[Loss],
    taps: StepTaps | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted total, raw terms) of `losses` on one batch. Run it under the run's autocast; the
    teacher is frozen and runs only when a loss reads it. `taps`: the stage's registered taps
    (`StepTaps` over these models and losses); None registers them for this call only."""
    reads_teacher = any(loss.reads_teacher for loss in losses)
    if teacher is None and reads_teacher:
        raise ValueError("these losses read a teacher, and the stage has none")
    if taps is None:
        with StepTaps(student, teacher, losses) as own:
            return distillation_losses(student, teacher, batch, losses, own)
    taps.clear()
    try:
        student_pred = student(batch.noisy, batch.timesteps, **batch.conditioning).sample
        teacher_pred = None
        if teacher is not None and reads_teacher:
            teacher_pred = teacher(batch.noisy, batch.timesteps, **batch.conditioning)
        outputs = StepOutputs(
            student_pred=at_least_fp32(student_pred),
            target=at_least_fp32(batch.target),
            teacher_pred=at_least_fp32(teacher_pred) if teacher_pred is not None else None,
            student_features=dict(taps.student.features),
            teacher_features=dict(taps.teacher.features) if taps.teacher is not None else {},
            timesteps=batch.timesteps,
            snr=batch.snr,
            prediction_type=batch.prediction_type,
        )
        terms: dict[str, Tensor] = {}
        for loss in losses:
            terms |= loss(outputs)
        return weighted_total(terms, losses), terms
    finally:
        taps.clear()
