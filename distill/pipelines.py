"""Loading and assembling Stable Diffusion pipelines: the one place that calls from_pretrained.

Safetensors only, no safety checker: the NSFW filter blacks out images, which would bias FID
(BK-SDM disables it for benchmarks too) and means nothing for a training teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from distill.errors import UserInputError


def load_sd_pipeline(
    source: str | Path, *, dtype: torch.dtype | None = None
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from a local folder or a hub id; bad input is one line."""
    if not Path(source).exists() and str(source).count("/") != 1:
        raise UserInputError(f"{str(source)!r} is neither an existing folder nor a hub id")
    try:
        return StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserInputError(
            f"cannot load a StableDiffusionPipeline from {str(source)!r}: {first_line}"
        ) from None


def with_unet(
    pipeline: StableDiffusionPipeline, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """The same pipeline around another UNet (the student): VAE, text encoder, tokenizer and
    scheduler are shared, not copied."""
    return StableDiffusionPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=unet,
        scheduler=pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
