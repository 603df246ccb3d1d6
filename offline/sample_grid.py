"""One-row-per-class sample grids: the visual check that a teacher's conditioning works.

Each row is one prompt (one Fashion-MNIST class), each column one fixed seed, so a glance shows
whether rows are class-consistent and whether two teachers differ on the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from core.image_grid import image_grid
from offline.fashion_mnist import FASHION_CLASSES, caption_for


def class_prompts() -> list[str]:
    """The grid's row prompts: "a photo of a t-shirt/top", ..., one per class, in label order."""
    return [caption_for(label, template_index=0) for label in range(len(FASHION_CLASSES))]


@torch.no_grad()
def sample_class_grid(
    pipeline,
    path: str | Path,
    seeds: Sequence[int] = tuple(range(8)),
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 50,
) -> Path:
    """Sample `prompts` (default: one per class) × `seeds` with a StableDiffusionPipeline and save
    the grid PNG, each row labelled with its class (32 px samples enlarged to 128 px)."""
    prompts = list(prompts) if prompts is not None else class_prompts()
    # One batch for the whole grid; one generator per image so the same seed gives the same
    # initial noise in every row.
    batch_prompts = [prompt for prompt in prompts for _ in seeds]
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts for seed in seeds]
    images = pipeline(
        batch_prompts,
        generator=generators,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
    ).images
    rows = [images[r * len(seeds) : (r + 1) * len(seeds)] for r in range(len(prompts))]
    labels = [
        prompt.removeprefix("a photo of ").removeprefix("a ").removeprefix("an ")
        for prompt in prompts
    ]
    grid = image_grid(rows, row_labels=labels, column_labels=[f"seed {seed}" for seed in seeds])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
