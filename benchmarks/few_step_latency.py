"""Pipeline latency of the few-step student against the 25-step one, at SD v1.4's shapes.

    .venv/bin/python benchmarks/few_step_latency.py [--dtype float32|bfloat16] [--repeats 3]

SD v1.4's pipeline shapes with random weights (nothing can be downloaded here): its VAE, CLIP
ViT-L text encoder, the PNDM scheduler of its folder, and the `base` student UNet
(layers_per_block=1). One 512 px image, on the CPU:

- the compact student as its distillation stages leave it: 25 PNDM steps with classifier-free
  guidance 7.5, i.e. 50 UNet evaluations;
- the same UNet after `kind: consistency` (a zero-initialised guidance embedding of width 256
  added, `distill.kinds.consistency.with_guidance_embedding`): 4 LCMScheduler steps, guidance
  through the embedding, 4 UNet evaluations.

Weights do not change the cost of a forward, so random ones time what trained ones would.
Prints one JSON object: seconds per image for each (eval.speed.pipeline_latency: text encoder,
every step, VAE decode), UNet evaluations per image, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, LCMScheduler, PNDMScheduler, StableDiffusionPipeline
from encode_throughput import SD_TEXT, SD_VAE
from transformers import CLIPTextConfig, CLIPTextModel

from core.families import builtin_config, family_named, unet_from_config
from distill.kinds.consistency import with_guidance_embedding
from eval.speed import pipeline_latency
from offline.tiny_models import SD_SCHEDULE
from offline.tokenizer import build_clip_tokenizer
from students import count_params, student_config

PROMPT = "a photograph of an astronaut riding a horse"


def random_sd_pipeline(
    dtype: torch.dtype, unet_config: dict[str, Any] | None = None
) -> StableDiffusionPipeline:
    """SD v1.4's components with random weights (seeded); the UNet from `unet_config`, by
    default the `base` student's."""
    torch.manual_seed(0)
    config = unet_config or student_config(builtin_config("sd-v1-4"), "base")
    unet = unet_from_config(config, device="cpu")
    scheduler = PNDMScheduler(
        **SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    )
    pipeline = family_named("sd").assemble(
        vae=AutoencoderKL(**SD_VAE),
        unet=unet,
        scheduler=scheduler,
        text_encoders=(CLIPTextModel(CLIPTextConfig(**SD_TEXT)),),
        tokenizers=(build_clip_tokenizer(),),
    )
    return pipeline.to(dtype=dtype).to("cpu")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="of the 4-step image (median)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="of the 25-step image")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    pipeline = random_sd_pipeline(dtype)
    with torch.no_grad():
        # The 4-step image first: its warm-up call warms the text encoder, the VAE decoder and
        # the UNet kernels for both, so the one 25-step image (minutes on a CPU) needs none.
        few_step_unet = with_guidance_embedding(pipeline.unet, 256).to(dtype)
        scheduler = LCMScheduler.from_config(pipeline.scheduler.config, original_inference_steps=50)
        few_step = family_named("sd").with_parts(
            pipeline, {"unet": few_step_unet, "scheduler": scheduler}
        )
        few = pipeline_latency(
            few_step,
            PROMPT,
            num_inference_steps=4,
            guidance_scale=7.5,
            scheduler="lcm",
            warmup=1,
            repeats=args.repeats,
        )
        many = pipeline_latency(
            pipeline,
            PROMPT,
            num_inference_steps=25,
            guidance_scale=7.5,
            scheduler="pndm",
            warmup=0,
            repeats=args.slow_repeats,
        )
    result = {
        "shapes": "SD v1.4, base student UNet, 512 px, batch 1, random weights",
        "unet_params": count_params(pipeline.unet),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "25_steps_cfg": {"seconds": many.value, "unet_evals": 50, "measured": many.detail},
        "4_steps_lcm": {"seconds": few.value, "unet_evals": 4, "measured": few.detail},
        "speedup": many.value / few.value,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
