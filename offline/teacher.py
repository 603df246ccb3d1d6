"""Train tiny Stable-Diffusion-format teachers on Fashion-MNIST, offline, on a CPU.

`train_fashion_teachers` mirrors how SD v1.4 and v1.5 came to be, in miniature:

    1. train an AutoencoderKL (f=4) on the images; measure the latent scaling factor;
    2. cache every training image's latent distribution (mean, std); assemble the family's
       pipeline around frozen, randomly initialised CLIP text encoders (the real CLIP tokenizer);
    3. train a UNet2DConditionModel on those latents with the distillation engine's noising step
       (`distill.step.noise_batch`: SD's noise schedule, ε or v target, classifier-free dropout
       to the empty prompt) and the family's conditioning, min-SNR-γ weighting, cosine LR decay
       and an EMA;
    4. export the EMA weights as pipeline folders of the family: teacher "a" halfway through UNet
       training (the v1.4 stand-in) and teacher "b" at the end (the v1.5 stand-in), each with a
       one-row-per-class sample grid.

The same function trains the SD v1 world (the demo's), SD 2.x-v's twin (`prediction_type=
"v_prediction"`, linear projections) and SDXL's (`family="sdxl"`).
"""

from __future__ import annotations

import copy
import json
import time
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from core.errors import UserInputError
from core.families import Conditioning, ModelFamily, family_named
from distill.step import noise_batch
from distill.step_randomness import sample_generator
from offline.fashion_mnist import (
    CAPTION_TEMPLATES,
    FASHION_CLASSES,
    caption_for,
    load_fashion_mnist_arrays,
)
from offline.sample_grid import sample_class_grid
from offline.tiny_models import (
    sampling_scheduler,
    tiny_sdxl_unet,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
    training_noise_scheduler,
)
from offline.tokenizer import build_clip_tokenizer

SOURCE_SIZE = 28  # Fashion-MNIST's images
IMAGE_SIZE = 32  # ...resized to a multiple of the VAE's factor 4

# ---------------------------------------------------------------------------------------------
# Pure helpers (math and data layout)
# ---------------------------------------------------------------------------------------------


def fashion_pixels(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (B, 28, 28) grey images → float (B, 3, size, size) in [-1, 1].

    Same as SD training scripts' `Resize(size, bilinear)` + `Normalize([0.5], [0.5])` on the RGB
    images `load_fashion_mnist` yields (bilinear upsampling needs no antialiasing).
    """
    pixels = torch.tensor(images, dtype=torch.float32).div(127.5).sub(1.0)  # copies
    pixels = F.interpolate(pixels[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return pixels.expand(-1, 3, -1, -1).contiguous()


def min_snr_weights(
    snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Per-sample loss weights, min(SNR, γ) / SNR for ε and min(SNR, γ) / (SNR + 1) for v.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (eq. 9 with
    the loss's implicit SNR weight divided out: SNR for ε, SNR + 1 for v): low-noise steps,
    which dominate the loss but teach little, are down-weighted.
    """
    clamped = torch.clamp(snr, max=gamma)
    return clamped / (snr + 1) if prediction_type == "v_prediction" else clamped / snr


def caption_table() -> list[str]:
    """Every training caption, indexed by `label * len(CAPTION_TEMPLATES) + template`, then the
    empty prompt (classifier-free guidance's unconditional input) at the last index."""
    captions = [
        caption_for(label, template)
        for label in range(len(FASHION_CLASSES))
        for template in range(len(CAPTION_TEMPLATES))
    ]
    return captions + [""]


# ---------------------------------------------------------------------------------------------
# Stage 1: the autoencoder
# ---------------------------------------------------------------------------------------------


def train_vae(
    vae: AutoencoderKL,
    images: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    generator: torch.Generator,
    accelerator: Accelerator,
    progress: bool,
) -> list[float]:
    """Train `vae` in place on uint8 images (N, 28, 28): L1 reconstruction + kl_weight·KL.

    Both terms are means per element, so `kl_weight` is independent of image and latent size.
    The KL term keeps the latent space smooth, which matters more for a diffusion model trained
    for minutes than the last bit of reconstruction sharpness. Returns the loss per step.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    vae, optimizer, schedule = accelerator.prepare(vae, optimizer, schedule)
    vae.train()
    losses = []
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for _ in bar:
        index = torch.randint(len(images), (batch_size,), generator=generator).numpy()
        pixels = fashion_pixels(images[index]).to(accelerator.device)  # (B, 3, 32, 32)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = (reconstruction - pixels).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = l1 + kl_weight * kl
        _update(accelerator, vae, loss, optimizer, schedule)
        losses.append(l1.item())
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    return losses


def _update(accelerator: Accelerator, model, loss, optimizer, schedule) -> None:
    """One clipped optimizer step (norm 1.0) and one LR-schedule step."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def encode_latent_distribution(
    vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior of every image: mean and std, each (N, 4, 8, 8), unscaled.

    Caching the distribution, not one sample, keeps UNet training exact: every step draws a
    fresh latent, as if the VAE encoder ran inside the loop.
    """
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = fashion_pixels(images[start : start + batch_size]).to(vae.device)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator
) -> float:
    """1 / std of sampled latents: the `scaling_factor` that gives the UNet unit-variance input
    (Rombach et al. 2022, LDM appendix; SD v1's 0.18215 was measured the same way)."""
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / sample.std())


# ---------------------------------------------------------------------------------------------
# Stage 2: the UNet, through the engine's noising step and the family's conditioning
# ---------------------------------------------------------------------------------------------

TEACHER_STREAM = 0  # the stage index of the teacher's sample stream (`sample_generator`)


def train_unet(
    unet: UNet2DConditionModel,
    conditioning: Conditioning,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: torch.Tensor,
    *,
    scheduler: DDPMScheduler,
    scaling_factor: float,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    min_snr_gamma: float | None,
    uncond_prob: float,
    ema_max_decay: float,
    seed: int,
    accelerator: Accelerator,
    progress: bool,
    on_checkpoint=None,
    checkpoint_steps: tuple[int, ...] = (),
) -> list[float]:
    """Train `unet` on cached latents; returns the (unweighted) loss per step.

    latent_mean/std: (N, 4, 8, 8) unscaled posteriors; labels: (N,) class ids. Each sample draws
    its row, caption template and (for SDXL) original size from its own generator, then
    `distill.step.noise_batch` noises it exactly as a distillation step does; `conditioning`
    turns the batch's token ids (and size ids) into the UNet's inputs, so one loop trains every
    family, ε or v. `on_checkpoint(step, ema_unet)` is called after each step in
    `checkpoint_steps` with a copy of the UNet holding the EMA weights.
    """
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    # EMA warmup (decay = 1 - (1 + step)^-2/3, capped): for a short run the average must start
    # following the weights at once, not after thousands of steps at a fixed 0.9999.
    ema = EMAModel(unet.parameters(), decay=ema_max_decay, use_ema_warmup=True, power=2 / 3)
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    unet.train()
    table = conditioning.caption_fields(caption_table())  # each (K, L), last row = ""
    empty = {key: ids[-1] for key, ids in table.items()}
    templates = len(CAPTION_TEMPLATES)
    prediction_type = scheduler.config.prediction_type
    losses = []
    bar = tqdm(range(1, steps + 1), desc="unet", disable=not progress)
    for step in bar:
        positions = range((step - 1) * batch_size, step * batch_size)
        generators = [sample_generator(seed, TEACHER_STREAM, p) for p in positions]
        rows = torch.cat([torch.randint(len(labels), (1,), generator=g) for g in generators])
        template = torch.cat([torch.randint(templates, (1,), generator=g) for g in generators])
        prompt = labels[rows] * templates + template  # (B,) rows of the caption table
        fields = {key: ids[prompt] for key, ids in table.items()} | _size_fields(
            conditioning, generators
        )
        batch = noise_batch(
            latent_mean[rows],
            latent_std[rows],
            fields,
            empty,
            generators,
            scheduler=scheduler,
            scaling_factor=scaling_factor,
            uncond_prob=uncond_prob,
            device=accelerator.device,
        )
        inputs = conditioning.encode(batch.conditioning)
        prediction = unet(batch.noisy, batch.timesteps, **inputs).sample
        per_sample = (prediction - batch.target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if min_snr_gamma is not None:
            snr = compute_snr(scheduler, batch.timesteps)
            loss = (per_sample * min_snr_weights(snr, min_snr_gamma, prediction_type)).mean()
        else:
            loss = per_sample.mean()
        _update(accelerator, unet, loss, optimizer, schedule)
        ema.step(unet.parameters())
        losses.append(per_sample.mean().item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        if on_checkpoint is not None and step in checkpoint_steps:
            ema_unet = copy.deepcopy(accelerator.unwrap_model(unet))
            ema.copy_to(ema_unet.parameters())
            on_checkpoint(step, ema_unet.eval())
    return losses


def _size_fields(
    conditioning: Conditioning, generators: list[torch.Generator]
) -> dict[str, torch.Tensor]:
    """The per-image fields (SDXL's size ids; none for SD), each (B, ...).

    Fashion-MNIST's originals are all 28 px, so a constant original-size id would leave the
    pipeline's default at sampling time (original = target = 32 px) an input the teacher never
    saw; each sample shows the true 28 px or the target size, at even odds.
    """
    per_sample = []
    for g in generators:
        side = SOURCE_SIZE if torch.rand(1, generator=g).item() < 0.5 else IMAGE_SIZE
        per_sample.append(conditioning.sample_fields((side, side), (0, 0), IMAGE_SIZE))
    if not per_sample[0]:
        return {}
    return {key: torch.stack([f[key] for f in per_sample]) for key in per_sample[0]}


# ---------------------------------------------------------------------------------------------
# Export and the whole recipe
# ---------------------------------------------------------------------------------------------


def teacher_parts(
    family: ModelFamily,
    *,
    seed: int,
    text_hidden_size: int,
    text_layers: int,
    text_init_factor: float,
) -> tuple[tuple[torch.nn.Module, ...], tuple]:
    """The frozen random text encoders and tokenizers of a family's teacher: one CLIPTextModel
    for SD; for SDXL a second one with a projection, whose projected pooled output is the
    UNet's `text_embeds` (both share the real CLIP tokenizer, as SDXL's two encoders share
    CLIP's vocabulary)."""
    tokenizer = build_clip_tokenizer()
    encoder = partial(
        tiny_text_encoder,
        hidden_size=text_hidden_size,
        num_hidden_layers=text_layers,
        initializer_factor=text_init_factor,
    )
    if family.name == "sdxl":
        second = encoder(seed + 1, projection_dim=text_hidden_size)
        return (encoder(seed), second), (tokenizer, tokenizer)
    return (encoder(seed),), (tokenizer,)


def teacher_unet(
    family: ModelFamily,
    *,
    text_hidden_size: int,
    block_out_channels: tuple[int, ...],
    transformer_layers: tuple[int, ...],
    use_linear_projection: bool,
) -> UNet2DConditionModel:
    if family.name == "sdxl":
        return tiny_sdxl_unet(
            cross_attention_dim=2 * text_hidden_size,
            pooled_text_dim=text_hidden_size,
            block_out_channels=block_out_channels,
            transformer_layers=transformer_layers,
        )
    return tiny_unet(
        cross_attention_dim=text_hidden_size,
        block_out_channels=block_out_channels,
        use_linear_projection=use_linear_projection,
    )


def train_fashion_teachers(
    out_dir: str | Path,
    *,
    vae_steps: int = 1000,
    unet_steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    vae_lr: float = 1e-3,
    vae_batch_size: int = 32,
    kl_weight: float = 1e-3,
    vae_channels: tuple[int, ...] = (16, 32, 64),
    unet_channels: tuple[int, ...] = (32, 64, 64),
    text_hidden_size: int = 32,
    text_layers: int = 2,
    text_init_factor: float = 1.0,
    max_train_samples: int | None = 20000,
    min_snr_gamma: float | None = 5.0,
    uncond_prob: float = 0.1,
    ema_max_decay: float = 0.999,
    warmup_steps: int = 100,
    grid_seeds: tuple[int, ...] = tuple(range(8)),
    guidance_scale: float = 4.0,
    grid_inference_steps: int = 50,
    export_halfway: bool = True,
    progress: bool = True,
    mixed_precision: str = "no",
    vae_from: str | Path | None = None,
    family: Literal["sd", "sdxl"] = "sd",
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    use_linear_projection: bool = False,
    transformer_layers: tuple[int, ...] = (1, 1, 2),
) -> dict[str, Path]:
    """Train the Fashion-MNIST teachers; return {"a": folder, "b": folder} (only "b" when
    `export_halfway` is False).

    `family`: "sd" (StableDiffusionPipeline; with `prediction_type="v_prediction"` and
    `use_linear_projection`, SD 2.x-v's twin) or "sdxl" (StableDiffusionXLPipeline: two text
    encoders, pooled text and size ids, `transformer_layers` per stage, the first unused).

    Writes under `out_dir`: `teacher_a/`, `teacher_b/` (pipeline folders of the family, 32 px),
    `teacher_a.png`, `teacher_b.png` (sample grids: one row per class, columns = `grid_seeds`)
    and `training.json` (settings, measured scaling factor, losses, phase times).
    `vae_from` (an AutoencoderKL folder) skips VAE training and reuses that VAE; its scaling
    factor is measured again on this run's images.

    Measured with the defaults on 2 CPU cores (fp32, lightly shared): 800 s in all (VAE 177 s,
    caches 12 s, UNet + both exports and grids 611 s); VAE test L1 0.049; a classifier (89% on
    real test images) labels 93% of teacher b's samples (guidance 4) with their prompt's class,
    84% of teacher a's. Without EMA, min-SNR and LR decay, 3000 steps gave noisy textures.
    """
    if vae_steps < 1 or unet_steps < 2 or batch_size < 1:
        raise UserInputError("vae_steps >= 1, unet_steps >= 2 and batch_size >= 1 are required")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in locals().items() if k != "out_dir"}
    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    record: dict = {"settings": settings, "seconds": {}}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        record["seconds"][phase] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    images, labels = load_fashion_mnist_arrays("train")
    images, labels = images[:max_train_samples], torch.from_numpy(labels[:max_train_samples])

    if vae_from is not None:
        vae, vae_losses = AutoencoderKL.from_pretrained(vae_from).eval(), [float("nan")]
    else:
        vae = tiny_vae(vae_channels)
        vae_losses = train_vae(
            vae,
            images,
            steps=vae_steps,
            batch_size=vae_batch_size,
            lr=vae_lr,
            kl_weight=kl_weight,
            generator=generator,
            accelerator=accelerator,
            progress=progress,
        )
        vae = accelerator.unwrap_model(vae)
    lap("vae")

    latent_mean, latent_std = encode_latent_distribution(vae, images)
    scaling_factor = latent_scaling_factor(latent_mean, latent_std, generator)
    vae.register_to_config(scaling_factor=scaling_factor)
    model_family = family_named(family)
    text_encoders, tokenizers = teacher_parts(
        model_family,
        seed=seed,
        text_hidden_size=text_hidden_size,
        text_layers=text_layers,
        text_init_factor=text_init_factor,
    )
    unet = teacher_unet(
        model_family,
        text_hidden_size=text_hidden_size,
        block_out_channels=unet_channels,
        transformer_layers=transformer_layers,
        use_linear_projection=use_linear_projection,
    )
    pipeline = model_family.assemble(
        vae=vae,
        unet=unet,
        scheduler=sampling_scheduler(prediction_type),
        text_encoders=tuple(e.to(accelerator.device) for e in text_encoders),
        tokenizers=tokenizers,
    )
    conditioning = model_family.conditioning(pipeline, encoders=True)
    lap("cache")

    folders: dict[str, Path] = {}

    def export(step: int, ema_unet: UNet2DConditionModel) -> None:
        name = "a" if step < unet_steps else "b"
        folder = out_dir / f"teacher_{name}"
        teacher = model_family.with_unet(pipeline, ema_unet)
        teacher.save_pretrained(folder, safe_serialization=True)
        teacher.set_progress_bar_config(disable=True)
        sample_class_grid(
            teacher,
            out_dir / f"teacher_{name}.png",
            seeds=grid_seeds,
            guidance_scale=guidance_scale,
            num_inference_steps=grid_inference_steps,
        )
        folders[name] = folder

    unet_losses = train_unet(
        unet,
        conditioning,
        latent_mean,
        latent_std,
        labels,
        scheduler=training_noise_scheduler(prediction_type),
        scaling_factor=scaling_factor,
        steps=unet_steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        min_snr_gamma=min_snr_gamma,
        uncond_prob=uncond_prob,
        ema_max_decay=ema_max_decay,
        seed=seed,
        accelerator=accelerator,
        progress=progress,
        on_checkpoint=export,
        checkpoint_steps=((unet_steps // 2,) if export_halfway else ()) + (unet_steps,),
    )
    lap("unet_and_export")

    record.update(
        scaling_factor=scaling_factor,
        vae_l1_last100=float(np.mean(vae_losses[-100:])),
        unet_loss_last100=float(np.mean(unet_losses[-100:])),
        vae_losses=vae_losses[:: max(1, len(vae_losses) // 200)],
        unet_losses=unet_losses[:: max(1, len(unet_losses) // 200)],
    )
    (out_dir / "training.json").write_text(json.dumps(record, indent=1, default=str))
    return folders
