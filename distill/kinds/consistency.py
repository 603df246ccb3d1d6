"""`kind: consistency`: latent consistency distillation, a few-step student of any UNet.

Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378), as diffusers'
`examples/consistency_distillation/train_lcm_distill_sd_wds.py` trains it, for every family and
for the compact student after its stages as for a teacher. One step, per sample:

    n ~ U{0..N-1}; τ = τ_n = (n + 1)·k − 1 over N = num_ddim_timesteps, k = T / N (T = 1000)
    z_τ = sqrt(ᾱ_τ)·z_0 + sqrt(1 − ᾱ_τ)·ε                    (the teacher's forward process)
    w ~ U[w_min, w_max], read by the student through a guidance embedding (time_cond_proj_dim)
    the teacher, guided:   x̂_0 = x̂_0(c) + w·(x̂_0(c) − x̂_0(∅)),  ε̂ likewise
    one DDIM step back:    z_{τ−k} = sqrt(ᾱ_{τ−k})·x̂_0 + sqrt(1 − ᾱ_{τ−k})·ε̂
    the student:           f_θ(z_τ, τ, w) = c_skip(τ)·z_τ + c_out(τ)·x̂_0(θ)
    the target:            f_θ⁻(z_{τ−k}, τ − k, w), θ⁻ an EMA of θ (decay 0.95), no grad
    loss:                  ‖f_θ − f_θ⁻‖² ("l2") or mean(sqrt((f_θ − f_θ⁻)² + c²) − c) ("huber")

The guidance convention is pinned here as the script's code computes it: the teacher target is
`cond + w·(cond − uncond)`, so w = 0 is the conditional prediction alone and w is one less than
the usual classifier-free guidance scale s (`uncond + s·(cond − uncond)`). The student's embedding
reads w; diffusers' pipelines feed it `guidance_scale − 1`, so sampling with `guidance_scale = s`
asks for w = s − 1. The unconditional input ∅ is the empty prompt, as the run's caption dropout
trains it (SDXL: the empty prompt's embeddings, not zeros).

x̂_0 and ε̂ follow the scheduler's `prediction_type` (ε or v: SD 2.x-v), so the student keeps its
teacher's parameterisation and LCMScheduler samples it with the same one. The teacher is the
stage's `teacher`, or without one a frozen copy of the stage's own starting student (the run's
earlier student distilling its own ODE). The new guidance projection starts at zero, so at step 0
the student is exactly the student it starts from.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from pydantic import Field, model_validator
from torch import Tensor, nn

from core.families import family_of
from distill.distributed_state import whole
from distill.kinds.base import KindOptions, StageSetup, ValidationSettings
from distill.kinds.latent import LatentStageKind
from distill.step import clean_latents_and_noise
from distill.step_randomness import sample_generator
from distill.taps import unwrap_model
from distill.teacher import FrozenTeacher
from distill.validation import GridRow

SIGMA_DATA = 0.5  # the consistency-model boundary scalings' data std (LCM: 0.5)


class ConsistencyOptions(KindOptions):
    num_ddim_timesteps: Annotated[int, Field(gt=0)] = 50
    w_min: Annotated[float, Field(ge=0.0)] = 5.0
    w_max: Annotated[float, Field(ge=0.0)] = 15.0
    time_cond_proj_dim: Annotated[int, Field(gt=0)] = 256
    target_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    timestep_scaling: Annotated[float, Field(gt=0.0)] = 10.0
    loss: Literal["l2", "huber"] = "l2"
    huber_c: Annotated[float, Field(gt=0.0)] = 0.001
    # How the student samples in grids, and what its model card says.
    sample_steps: Annotated[int, Field(gt=0)] = 4
    sample_guidance: Annotated[float, Field(ge=1.0)] | None = (
        None  # None: 1 + mid of [w_min, w_max]
    )

    @model_validator(mode="after")
    def _ordered(self) -> ConsistencyOptions:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must be at most w_max ({self.w_max})")
        return self

    @property
    def guidance_scale(self) -> float:
        """The `guidance_scale` to sample with: w + 1, w the middle of the trained range."""
        if self.sample_guidance is not None:
            return self.sample_guidance
        return 1.0 + (self.w_min + self.w_max) / 2


# ----------------------------------------------------------------------------- pure functions


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> Tensor:
    """The skipping-step solver's timesteps τ_n = round((n + 1)·k) − 1, n < N, k = T / N: (N,).
    (diffusers' script: `DDIMSolver`; T = 1000, N = 50 gives 19, 39, ..., 999.)"""
    step = num_train_timesteps // num_ddim_timesteps
    return (torch.arange(1, num_ddim_timesteps + 1) * step).round().long() - 1


def boundary_scalings(
    timesteps: Tensor, timestep_scaling: float, sigma_data: float = SIGMA_DATA
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the consistency parameterisation at integer `timesteps` (B,):
    c_skip = σ_d² / ((s·t)² + σ_d²), c_out = s·t / sqrt((s·t)² + σ_d²). At t = 0, (1, 0): the
    function is the identity there, the boundary condition f(x, 0) = x."""
    scaled = timestep_scaling * timesteps.double()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) → (B, 1, 1, 1) in `like`'s dtype and device, to scale a (B, C, h, w) batch."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def predicted_original(
    output: Tensor, timesteps: Tensor, sample: Tensor, prediction_type: str, alphas_cumprod: Tensor
) -> Tensor:
    """x̂_0 from a UNet output: (x − sqrt(1 − ᾱ)·ε̂) / sqrt(ᾱ) for ε, sqrt(ᾱ)·x − sqrt(1 − ᾱ)·v̂
    for v (Salimans & Ho 2022)."""
    alpha_bar = _per_sample(alphas_cumprod[timesteps], sample)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


def predicted_noise(
    output: Tensor, timesteps: Tensor, sample: Tensor, prediction_type: str, alphas_cumprod: Tensor
) -> Tensor:
    """ε̂ from a UNet output: the output itself for ε, sqrt(ᾱ)·v̂ + sqrt(1 − ᾱ)·x for v."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        alpha_bar = _per_sample(alphas_cumprod[timesteps], sample)
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


def ddim_step(pred_original: Tensor, pred_noise: Tensor, alpha_bar_previous: Tensor) -> Tensor:
    """The deterministic DDIM update to the previous timestep (η = 0; Song et al. 2021, eq. 12):
    sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev)·ε̂, with `alpha_bar_previous` (B,)."""
    alpha_bar = _per_sample(alpha_bar_previous, pred_original)
    return alpha_bar.sqrt() * pred_original + (1 - alpha_bar).sqrt() * pred_noise


def guided(cond: Tensor, uncond: Tensor, w: Tensor) -> Tensor:
    """The pinned guidance convention: cond + w·(cond − uncond), w (B,)."""
    return cond + _per_sample(w, cond) * (cond - uncond)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of w·1000, (B,) → (B, dim) (VDM's, as diffusers' pipelines'
    `get_guidance_scale_embedding` computes it: tested equal)."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def consistency_loss(prediction: Tensor, target: Tensor, loss: str, huber_c: float) -> Tensor:
    difference = prediction.float() - target.float()
    if loss == "l2":
        return difference.pow(2).mean()
    return (torch.sqrt(difference.pow(2) + huber_c**2) - huber_c).mean()


def _cat(first: Any, second: Any) -> Any:
    """Two batches of UNet keyword inputs side by side (tensors, also inside dicts)."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    return {key: _cat(value, second[key]) for key, value in first.items()}


def with_guidance_embedding(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """`unet` with a guidance embedding of width `dim` added to its time embedding, zero
    initialised (the time embedding's `cond_proj`), so it computes exactly what `unet` does."""
    if unet.config.time_cond_proj_dim is not None:
        return unet
    # Private keys dropped: diffusers 0.42 resets every key listed in `_use_default_values`
    # (time_cond_proj_dim among them) to its default, which would silently drop the override.
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    student = student.to(unet.dtype)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"guidance embedding: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.train(unet.training)


# ----------------------------------------------------------------------------- the kind


class ConsistencyKind(LatentStageKind):
    name: ClassVar[str] = "consistency"
    Options: ClassVar[type[KindOptions]] = ConsistencyOptions
    uses_teacher: ClassVar[bool] = True

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        options: ConsistencyOptions = setup.options
        scheduler = self.noise_scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.to(setup.device, setup.precision.weights)
        self.solver_timesteps = ddim_timesteps(
            scheduler.config.num_train_timesteps, options.num_ddim_timesteps
        ).to(setup.device)
        self.skip = scheduler.config.num_train_timesteps // options.num_ddim_timesteps
        self.teacher = setup.teacher
        self.target: nn.Module | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.teacher is None:  # the stage's starting student teaches itself
            self.teacher = FrozenTeacher(copy.deepcopy(model), self.setup.precision.compute)
            self.teacher.to(self.setup.device)
        return with_guidance_embedding(model, self.setup.options.time_cond_proj_dim)

    def start(self, model: nn.Module) -> None:
        # A whole copy on every process (gathered when the student is sharded).
        network = unwrap_model(model)
        target = UNet2DConditionModel.from_config(network.config).to(network.dtype)
        target.load_state_dict(whole(network.state_dict()))
        self.target = target.to(self.setup.device).requires_grad_(False).eval()

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict]:
        options: ConsistencyOptions = self.setup.options
        z_t, start, w, cond, uncond = self._draw(batch)
        embedding = guidance_embedding(w, options.time_cond_proj_dim).to(z_t.device, z_t.dtype)
        previous = (start - self.skip).clamp(min=0)  # τ − k

        output = model(z_t, start, timestep_cond=embedding, **cond).sample
        prediction = self._consistency_function(output, start, z_t)
        with torch.no_grad():
            z_previous = self._teacher_step(z_t, start, w, cond, uncond, previous)
            target_output = self.target(
                z_previous, previous, timestep_cond=embedding, **cond
            ).sample
            target = self._consistency_function(target_output, previous, z_previous)
        loss = consistency_loss(prediction, target, options.loss, options.huber_c)
        return loss, {"consistency": loss}

    def _draw(self, batch: Mapping[str, Any]) -> tuple:
        """Per sample from its own generator, in a fixed order: posterior draw, noise, solver
        index, w. Returns z_τ, τ, w and the encoded conditional and unconditional inputs."""
        setup, options = self.setup, self.setup.options
        generators = [sample_generator(setup.seed, setup.index, int(p)) for p in batch["positions"]]
        dtype = setup.precision.weights
        latents, noise = clean_latents_and_noise(
            batch["latent_mean"],
            batch["latent_std"],
            generators,
            self.cache.scaling_factor,
            self.cache.shift_factor,
            dtype,
        )
        count = options.num_ddim_timesteps
        index = torch.cat([torch.randint(0, count, (1,), generator=g) for g in generators])
        w = torch.cat([torch.rand(1, generator=g) for g in generators])
        w = options.w_min + (options.w_max - options.w_min) * w
        latents, noise = latents.to(setup.device), noise.to(setup.device)
        start = self.solver_timesteps[index.to(setup.device)]  # (B,)
        z_t = self.noise_scheduler.add_noise(latents, noise, start)
        fields = batch["conditioning"]
        empty = {
            key: value.expand(len(generators), *value.shape)
            for key, value in self.cache.empty_conditioning.items()
        }
        cond = self.conditioning.encode(fields)
        uncond = self.conditioning.encode({**fields, **empty})
        return z_t, start, w.to(setup.device), cond, uncond

    def _consistency_function(self, output: Tensor, timesteps: Tensor, sample: Tensor) -> Tensor:
        original = predicted_original(
            output.to(sample.dtype), timesteps, sample, self.prediction_type, self.alphas_cumprod
        )
        c_skip, c_out = boundary_scalings(timesteps, self.setup.options.timestep_scaling)
        return _per_sample(c_skip, sample) * sample + _per_sample(c_out, sample) * original

    def _teacher_step(self, z_t, start, w, cond, uncond, previous) -> Tensor:
        """One guided DDIM step of the teacher from τ to τ − k (both branches in one batch)."""
        both = self.teacher(_cat(z_t, z_t), _cat(start, start), **_cat(cond, uncond))
        conditional, unconditional = both.to(z_t.dtype).chunk(2)
        args = (start, z_t, self.prediction_type, self.alphas_cumprod)
        x0 = guided(
            predicted_original(conditional, *args), predicted_original(unconditional, *args), w
        )
        eps = guided(predicted_noise(conditional, *args), predicted_noise(unconditional, *args), w)
        # τ − k clamps at 0 for n = 0, where the step goes to ᾱ_0 (the script's prev table).
        return ddim_step(x0, eps, self.alphas_cumprod[previous])

    @torch.no_grad()
    def after_update(self, model: nn.Module) -> None:
        """θ⁻ ← decay·θ⁻ + (1 − decay)·θ, in one foreach call."""
        student = [whole(p.detach()) for p in unwrap_model(model).parameters()]
        target = list(self.target.parameters())
        torch._foreach_lerp_(target, student, 1.0 - self.setup.options.target_decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"target.{key}": value for key, value in self.target.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.target.load_state_dict({k.removeprefix("target."): v for k, v in state.items()})

    @classmethod
    def sampling(cls, pipeline: DiffusionPipeline, options: KindOptions) -> DiffusionPipeline:
        """The pipeline with LCMScheduler over the same noise schedule, the kind's solver grid
        and boundary scaling."""
        scheduler = LCMScheduler.from_config(
            pipeline.scheduler.config,
            original_inference_steps=options.num_ddim_timesteps,
            timestep_scaling=options.timestep_scaling,
        )
        return family_of(pipeline).with_parts(pipeline, {"scheduler": scheduler})

    @classmethod
    def usage(cls, options: KindOptions) -> dict[str, Any]:
        return {
            "num_inference_steps": options.sample_steps,
            "guidance_scale": options.guidance_scale,
        }

    def grid_rows(self, model: UNet2DConditionModel, settings: ValidationSettings) -> dict:
        """The teacher as it samples (the run's validation steps, with guidance), the student
        at the kind's few steps, its guidance through the embedding."""
        options: ConsistencyOptions = self.setup.options
        components = self.setup.components
        label = f"teacher {self.setup.teacher_key or '(the starting student)'}"
        student = self.sampling(components.with_unet(model), options)
        return {
            label: GridRow(
                components.with_unet(self.teacher.unet), settings.steps, settings.guidance
            ),
            f"student, {options.sample_steps} steps": GridRow(
                student, options.sample_steps, options.guidance_scale
            ),
        }
