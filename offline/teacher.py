"""Tiny Stable-Diffusion-format teachers trained on Fashion-MNIST, offline, on a CPU, by the engine.

`train_fashion_teachers` mirrors how SD v1.4 and v1.5 came to be, in miniature, with no loop of
its own:

    1. the untrained pipeline of the family: a fresh AutoencoderKL (f=4), frozen randomly
       initialised CLIP text encoders with the real CLIP tokenizer, a fresh UNet, SD's scheduler
       (`untrained_pipeline`, saved once as OUT/untrained);
    2. one engine run (`distill.trainer`, OUT/run) of two stages: `autoencoder` trains the VAE
       and measures its latent scaling factor; `distill` with the task loss alone (min-SNR-γ
       weighted) trains the UNet from scratch on the VAE's latent cache, with cosine LR decay and
       a warmed-up EMA, saving the EMA weights halfway (`save_at`). Checkpoints, resume, the step
       guard and the logs are the engine's, as for any student;
    3. teacher "a" (the halfway UNet, the v1.4 stand-in) and teacher "b" (the end, v1.5's) as
       pipeline folders of the family, each with a one-row-per-class sample grid.

The same settings train the SD v1 world (the demo's), SD 2.x-v's twin (`prediction_type=
"v_prediction"`, linear projections) and SDXL's (`family: sdxl`, SDXL's layout).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field

from core.atomic import atomic_folder
from core.families import family_named, resolve
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from offline.fashion_mnist import IMAGE_SIZE
from offline.sample_grid import sample_class_grid
from offline.tiny_models import sampling_scheduler, tiny_text_encoder, tiny_unet, tiny_vae
from offline.tokenizer import build_clip_tokenizer

PositiveInt = Annotated[int, Field(gt=0)]


class TeacherSettings(BaseModel):
    """A teacher recipe's `train:` block: what the untrained pipeline is and how it trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The pipeline
    family: str = "sd"  # a core.families name
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    vae_channels: tuple[PositiveInt, ...] = (16, 32, 64)
    unet_channels: tuple[PositiveInt, ...] = (32, 64, 64)
    plain_stage: Literal["deepest", "first"] = "deepest"  # the stage without attention
    use_linear_projection: bool = False
    transformer_layers: tuple[PositiveInt, ...] | None = None  # per stage; None: one each
    time_ids_embed_dim: PositiveInt = 8  # width per size id, for families that embed them
    text_hidden_size: PositiveInt = 32
    text_layers: PositiveInt = 2
    text_init_factor: Annotated[float, Field(gt=0)] = 1.0
    # Training
    seed: int = 0
    max_train_samples: PositiveInt | None = 20000
    vae_steps: PositiveInt = 1000
    vae_batch_size: PositiveInt = 32
    vae_lr: Annotated[float, Field(gt=0)] = 1e-3
    kl_weight: Annotated[float, Field(ge=0)] = 1e-3
    unet_steps: Annotated[int, Field(ge=2)] = 2000
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0)] = 2e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    min_snr_gamma: Annotated[float, Field(gt=0)] | None = 5.0
    uncond_prob: Annotated[float, Field(ge=0, le=1)] = 0.1
    ema_max_decay: Annotated[float, Field(gt=0, lt=1)] = 0.999
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: PositiveInt = 250
    # Exports
    export_halfway: bool = True
    guidance_scale: Annotated[float, Field(ge=1)] = 4.0
    grid_seeds: tuple[int, ...] = tuple(range(8))
    grid_inference_steps: PositiveInt = 50


def untrained_pipeline(settings: TeacherSettings) -> DiffusionPipeline:
    """The family's pipeline before any training, seeded: a fresh VAE and UNet, frozen random
    CLIP text encoders (one per encoder the family has; a projected one gives the pooled
    embedding SDXL's UNet reads) sharing the real CLIP tokenizer, SD v1.4's sampler."""
    family = family_named(settings.family)
    torch.manual_seed(settings.seed)
    width = settings.text_hidden_size
    encoders = tuple(
        tiny_text_encoder(
            settings.seed + i,
            hidden_size=width,
            num_hidden_layers=settings.text_layers,
            initializer_factor=settings.text_init_factor,
            projection_dim=width if projected else None,
        )
        for i, projected in enumerate(family.text_encoder_projections)
    )
    unet = tiny_unet(
        block_out_channels=settings.unet_channels,
        use_linear_projection=settings.use_linear_projection,
        plain_stage=settings.plain_stage,
        transformer_layers=settings.transformer_layers,
        **family.unet_conditioning_config((width,) * len(encoders), settings.time_ids_embed_dim),
    )
    return family.assemble(
        vae=tiny_vae(settings.vae_channels, image_size=IMAGE_SIZE),
        unet=unet,
        scheduler=sampling_scheduler(settings.prediction_type),
        text_encoders=encoders,
        tokenizers=(build_clip_tokenizer(),) * len(encoders),
    )


def teacher_run_recipe(settings: TeacherSettings, name: str, out: Path) -> dict[str, Any]:
    """The engine recipe that trains the teachers: the VAE, then the UNet from scratch."""
    return {
        "name": name,
        "output_dir": str(out / "run"),
        "seed": settings.seed,
        "teachers": {"untrained": str(out / "untrained")},
        "student": {"variant": "full", "init_from": "untrained"},
        "data": {
            "source": "fashion-mnist",
            "max_samples": settings.max_train_samples,
            "resolution": IMAGE_SIZE,
            "random_flip": False,  # garments have a handedness
            # The 28 px images are upscaled to 32: SDXL's size ids say 32, as sampling will.
            "size_ids": "target",
            "encode_batch_size": 256,
        },
        "training": {
            "mixed_precision": settings.mixed_precision,
            "uncond_prob": settings.uncond_prob,
            # Warm-up (decay 1 - (1 + step)^-2/3, capped): a run of minutes must follow the
            # weights at once, not after thousands of steps at a fixed 0.999.
            "ema": {"decay": settings.ema_max_decay, "warmup_power": 2 / 3},
            "checkpoint_every": settings.checkpoint_every,
            "keep_last": 1,
            "log_every": 10,
        },
        "stages": [
            {
                "name": "vae",
                "kind": "autoencoder",
                "steps": settings.vae_steps,
                "batch_size": settings.vae_batch_size,
                "lr": settings.vae_lr,
                "lr_schedule": "cosine",
                "warmup_steps": min(100, settings.vae_steps // 10),
                "ema": {"enabled": False},
                "options": {"kl_weight": settings.kl_weight},
            },
            {
                "name": "unet",
                "steps": settings.unet_steps,
                "batch_size": settings.batch_size,
                "lr": settings.lr,
                "lr_schedule": "cosine",
                "warmup_steps": settings.warmup_steps,
                "losses": {"task": {"min_snr_gamma": settings.min_snr_gamma}},
                "save_at": [settings.unet_steps // 2] if settings.export_halfway else [],
            },
        ],
    }


def train_fashion_teachers(
    out_dir: str | Path, settings: TeacherSettings, *, name: str = "teachers", progress: bool = True
) -> dict[str, Path]:
    """Train (or resume training) the teachers; return {"a": folder, "b": folder} (only "b"
    without `export_halfway`).

    Writes under `out_dir`: `untrained/` (the pipeline before training), `run/` (the engine's run
    folder: checkpoints, logs, each stage's network), `teacher_a/`, `teacher_b/` (pipeline
    folders of the family, 32 px), `teacher_a.png`, `teacher_b.png` (sample grids: one row per
    class, columns = `grid_seeds`) and `training.json` (settings, scaling factor, last terms,
    times).

    Measured with the demo's settings (recipes/fashion_teacher.yaml) on 2 CPU cores: see the
    README's offline-world section.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock, seconds = time.perf_counter(), {}
    untrained = out / "untrained"
    if not (untrained / "model_index.json").is_file():
        with atomic_folder(untrained) as folder:
            untrained_pipeline(settings).save_pretrained(folder, safe_serialization=True)
    recipe = validate_recipe(teacher_run_recipe(settings, name, out), source="teacher recipe")
    trainer = DistillationTrainer(recipe, progress=progress)
    trainer.train()
    seconds["run"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    run = Path(recipe.output_dir)
    final = resolve(trainer.folder.student_pipeline).pipeline()
    family = family_named(settings.family)
    pipelines = {"b": final}
    if settings.export_halfway:
        halfway = trainer.folder.snapshot(len(recipe.stages) - 1, settings.unet_steps // 2)
        unet = UNet2DConditionModel.from_pretrained(halfway, use_safetensors=True)
        pipelines = {"a": family.with_unet(final, unet.eval()), "b": final}
    folders = {}
    for key, pipeline in pipelines.items():
        folders[key] = out / f"teacher_{key}"
        with atomic_folder(folders[key]) as folder:
            pipeline.save_pretrained(folder, safe_serialization=True)
        pipeline.set_progress_bar_config(disable=True)
        sample_class_grid(
            pipeline,
            out / f"teacher_{key}.png",
            seeds=settings.grid_seeds,
            guidance_scale=settings.guidance_scale,
            num_inference_steps=settings.grid_inference_steps,
        )
    seconds["export"] = round(time.perf_counter() - clock, 1)
    _write_record(out, settings, final, run, seconds)
    return folders


def _write_record(
    out: Path, settings: TeacherSettings, final: DiffusionPipeline, run: Path, seconds: dict
) -> None:
    """training.json: what made the teachers, and where the full log is."""
    last: dict[str, dict[str, float]] = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        last[record["stage"]] = {k: v for k, v in record.items() if k.startswith("loss/")}
    (out / "training.json").write_text(
        json.dumps(
            {
                "settings": settings.model_dump(mode="json"),
                "scaling_factor": final.vae.config.scaling_factor,
                "last_logged_terms": last,
                "seconds": seconds,
                "log": str((run / "logs" / "metrics.jsonl").relative_to(out)),
            },
            indent=1,
        )
    )
