"""Images for a prompt list from a diffusers `StableDiffusionPipeline`, resumable.

Image i uses prompt i and seed `base_seed + i`, with its own CPU `torch.Generator`: its initial
noise does not depend on the batch it lands in, on the device, or on which images were already
on disk. Each image is written as `{i:06d}.png` the moment its batch finishes (via a temporary
name, so a killed run never leaves half a PNG), and `manifest.json` records prompt, seed and
settings. A rerun into the same folder skips finished files, so an interrupted 30K run resumes
where it stopped; a rerun with other settings or prompts is refused rather than mixing two
experiments.

BK-SDM's protocol (`src/generate.py`): PNDM, 25 steps, guidance 7.5, 512 px, then
`Image.resize((256, 256))` (bicubic).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from tqdm.auto import tqdm

from distill.errors import UserInputError
from eval.image_io import resize_square

MANIFEST = "manifest.json"
SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
# SD v1.x ships PNDM with `skip_prk_steps=True` (PLMS steps only; what BK-SDM ran). Built from
# another scheduler's config, PNDM would default to Runge-Kutta warm-up steps (extra UNet calls).
SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {"pndm": {"skip_prk_steps": True}}


@dataclass(frozen=True)
class GeneratedImages:
    """`paths[i]` shows `prompts[i]` generated from seed `seeds[i]`; `newly_generated` lists the
    indices this call produced (the rest were already on disk)."""

    folder: Path
    paths: list[Path]
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    newly_generated: list[int]


def image_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.png"


def scheduler_for(pipeline: StableDiffusionPipeline, name: str) -> Any:
    """The pipeline's scheduler if it already is `name`, else `name` built from its config."""
    if name not in SCHEDULERS:
        raise UserInputError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    scheduler_class = SCHEDULERS[name]
    if type(pipeline.scheduler) is scheduler_class:
        return pipeline.scheduler
    return scheduler_class.from_config(
        pipeline.scheduler.config, **SCHEDULER_OVERRIDES.get(name, {})
    )


@contextmanager
def using_scheduler(pipeline: StableDiffusionPipeline, name: str) -> Iterator[None]:
    """Run the pipeline with scheduler `name` inside the block, then restore its own."""
    original = pipeline.scheduler
    pipeline.scheduler = scheduler_for(pipeline, name)
    try:
        yield
    finally:
        pipeline.scheduler = original


def generate_images(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    base_seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    output_size: int | None = None,
    scheduler: str = "pndm",
    batch_size: int = 4,
    progress: bool = True,
) -> GeneratedImages:
    """Generate `prompts[i]` with seed `base_seed + i` into `out_dir/{i:06d}.png`, skipping files
    that exist. `height`/`width` default to the pipeline's native size; `output_size` resizes the
    saved images to squares of that side (BK-SDM: 512 → 256). The pipeline's scheduler is swapped
    for `scheduler` during the call and restored after it."""
    if not prompts:
        raise UserInputError("no prompts to generate images for")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be positive, got {batch_size}")
    native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    settings = {
        "model": str(pipeline.config.get("_name_or_path", "") or type(pipeline.unet).__name__),
        "scheduler": scheduler,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height or native,
        "width": width or native,
        "output_size": output_size,
    }
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = [base_seed + index for index in range(len(prompts))]
    _write_manifest(folder, settings, list(prompts), seeds)

    missing = [i for i in range(len(prompts)) if not image_path(folder, i).is_file()]
    pipeline.set_progress_bar_config(disable=True)  # one bar over images, not one per batch
    bar = tqdm(total=len(prompts), desc="generate", unit="img", disable=not progress)
    bar.update(len(prompts) - len(missing))
    with using_scheduler(pipeline, scheduler):
        for chunk in _chunks(missing, batch_size):
            images = pipeline(
                [prompts[i] for i in chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=settings["height"],
                width=settings["width"],
                # CPU generators: the same seed gives the same noise on every device.
                generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in chunk],
                output_type="pil",
            ).images
            for index, image in zip(chunk, images, strict=True):
                if output_size is not None:
                    image = resize_square(image, output_size)
                _save_png(image, image_path(folder, index))
            bar.update(len(chunk))
    bar.close()
    return GeneratedImages(
        folder=folder,
        paths=[image_path(folder, i) for i in range(len(prompts))],
        prompts=list(prompts),
        seeds=seeds,
        settings=settings,
        newly_generated=missing,
    )


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _save_png(image: Image.Image, path: Path) -> None:
    partial = path.with_suffix(".partial")
    image.save(partial, format="PNG")
    partial.replace(path)


def _write_manifest(
    folder: Path, settings: dict[str, Any], prompts: list[str], seeds: list[int]
) -> None:
    """Write the manifest, after checking that images already in `folder` were made the same way."""
    manifest_file = folder / MANIFEST
    images = [
        {"file": image_path(folder, i).name, "prompt": prompt, "seed": seed}
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True))
    ]
    if manifest_file.is_file():
        previous = json.loads(manifest_file.read_text(encoding="utf-8"))
        if previous.get("settings") != settings:
            raise UserInputError(
                f"{folder} holds images made with other settings ({previous.get('settings')}); "
                "use another folder"
            )
        for old, new in zip(previous.get("images", []), images, strict=False):
            if old != new:
                raise UserInputError(
                    f"{folder}/{new['file']} was made for prompt {old['prompt']!r} seed "
                    f"{old['seed']}, not {new['prompt']!r} seed {new['seed']}; use another folder"
                )
    manifest = {"settings": settings, "images": images}
    manifest_file.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
