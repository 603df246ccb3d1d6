"""Validation grids during training: one row per model, one column per prompt, same seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from core.image_grid import image_grid


@torch.no_grad()
def generate_row(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    device: torch.device | str,
) -> list[Image.Image]:
    """One image per prompt; prompt i always uses seed + i, whatever the model."""
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipeline(
        list(prompts),
        generator=generators,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    ).images


@dataclass(frozen=True)
class GridRow:
    """One row of a grid: a pipeline and how it samples (a few-step student beside a teacher
    sampled as usual)."""

    pipeline: DiffusionPipeline
    num_inference_steps: int
    guidance_scale: float


def save_validation_grid(
    rows: Mapping[str, GridRow],
    prompts: Sequence[str],
    path: Path,
    *,
    seed: int,
    device: torch.device | str,
) -> Path:
    images = {
        label: generate_row(
            row.pipeline,
            prompts,
            seed=seed,
            num_inference_steps=row.num_inference_steps,
            guidance_scale=row.guidance_scale,
            device=device,
        )
        for label, row in rows.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small images (the offline world's 32 px) are enlarged so a person can see them.
    image_grid(list(images.values()), row_labels=list(images), column_labels=prompts).save(path)
    return path
