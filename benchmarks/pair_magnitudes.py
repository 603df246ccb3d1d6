"""How large each layer pair's feature term is: one layer can dwarf the others (BK-SDM issue #21).

Prints, per layer pair, the similarity term (MSE of G = H·Hᵀ/C, pooled to 256 positions) and
the feature-KD term (MSE of the features), each raw and normalized by the teacher side's mean
square (`normalize: teacher`, after LAPTOP-Diff), averaged over a few seeded batches. Everything
runs through the engine's own `noise_batch` and `distillation_losses`.

    .venv/bin/python benchmarks/pair_magnitudes.py sd               # SD v1.4 shapes, random weights
    .venv/bin/python benchmarks/pair_magnitudes.py offline \\
        --student runs/fashion_small_sd/stages/02-soft_labels/unet \\
        --teacher runs/fashion_teacher/teacher_b                     # the end of the demo's stage 2

`sd`: a seeded random-weight SD v1.4 UNet as teacher and the `base` student built from it (so the
student starts as the teacher's own layers), 64×64 latents, random text embeddings, batch 1.
`offline`: a trained student against a teacher pipeline on real Fashion-MNIST test images, encoded
by that pipeline's VAE and text encoder.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from core.families import builtin_config, encode_captions, unet_from_config
from distill.losses import build_losses, validate_loss_blocks
from distill.step import distillation_losses, noise_batch
from distill.teacher import FrozenTeacher
from offline.fashion_mnist import caption_for, fashion_pixels, load_fashion_mnist_arrays
from offline.tiny_models import sd_v1_4_toy_config, training_noise_scheduler
from students import build_student

LOSS_BLOCKS = {
    "similarity": {"max_positions": 256},
    "feature_kd": {},
    "similarity_normalized": {"max_positions": 256, "normalize": "teacher"},
    "feature_kd_normalized": {"normalize": "teacher"},
}


def pair_terms(
    student: UNet2DConditionModel,
    teacher: FrozenTeacher,
    batches: Sequence[dict[str, Any]],
    scheduler: DDPMScheduler,
) -> dict[str, dict[str, float]]:
    """{loss variant: {pair: mean term over batches}} for the four variants of LOSS_BLOCKS."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for variant, block in LOSS_BLOCKS.items():
        name = variant.removesuffix("_normalized")
        losses = build_losses(validate_loss_blocks({name: block}), student.config, teacher.config)
        for batch in batches:
            noisy = noise_batch(**batch, scheduler=scheduler)
            with torch.no_grad():
                _, terms = distillation_losses(student, teacher, noisy, losses)
            for key, value in terms.items():
                if "/" in key:
                    totals[variant][key.split("/", 1)[1]] += value.item() / len(batches)
    return {variant: dict(pairs) for variant, pairs in totals.items()}


def sd_batches(text_dim: int, count: int, latent: int = 64) -> list[dict[str, Any]]:
    batches = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        batches.append(
            {
                "latent_mean": torch.randn(1, 4, latent, latent, generator=generator),
                "latent_std": torch.full((1, 4, latent, latent), 0.05),
                "conditioning": {
                    "encoder_hidden_states": torch.randn(1, 77, text_dim, generator=generator)
                },
                "unconditional": {},
                "generators": [torch.Generator().manual_seed(1000 + index)],
                "scaling_factor": 1.0,
            }
        )
    return batches


def offline_batches(pipeline: StableDiffusionPipeline, count: int, size: int) -> list[dict]:
    images, labels = load_fashion_mnist_arrays("test")
    batches = []
    for index in range(count):
        rows = slice(index * size, (index + 1) * size)
        with torch.no_grad():
            posterior = pipeline.vae.encode(fashion_pixels(images[rows])).latent_dist
        captions = [caption_for(int(label), 0) for label in labels[rows]]
        hidden = encode_captions(pipeline.text_encoder, pipeline.tokenizer, captions)
        batches.append(
            {
                "latent_mean": posterior.mean,
                "latent_std": posterior.std,
                "conditioning": {"encoder_hidden_states": hidden},
                "unconditional": {},
                "generators": [
                    torch.Generator().manual_seed(index * size + i) for i in range(size)
                ],
                "scaling_factor": pipeline.vae.config.scaling_factor,
            }
        )
    return batches


def table(results: dict[str, dict[str, float]]) -> str:
    pairs = list(results["similarity"])
    lines = [
        "| pair | similarity | similarity, normalized | feature KD | feature KD, normalized |",
        "|---|---|---|---|---|",
    ]
    for pair in pairs:
        cells = [
            results[v].get(pair, float("nan"))
            for v in ("similarity", "similarity_normalized", "feature_kd", "feature_kd_normalized")
        ]
        lines.append(f"| `{pair}` | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", choices=("sd", "offline"))
    parser.add_argument("--student", type=Path, help="offline: the student UNet folder")
    parser.add_argument("--teacher", type=Path, help="offline: the teacher pipeline folder")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="offline batch size")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="sd: SD v1.4 at toy widths (smoke run)")
    args = parser.parse_args(argv)
    if args.world == "sd":
        torch.manual_seed(0)
        config = sd_v1_4_toy_config() if args.tiny else builtin_config("sd-v1-4")
        teacher_unet = unet_from_config(config)
        student, _ = build_student(teacher_unet, "base")
        teacher = FrozenTeacher(teacher_unet)
        latent = config["sample_size"]
        batches = sd_batches(config["cross_attention_dim"], args.batches, latent)
        scheduler = training_noise_scheduler()
    else:
        if args.student is None or args.teacher is None:
            parser.error("offline needs --student and --teacher")
        pipeline = StableDiffusionPipeline.from_pretrained(args.teacher, safety_checker=None)
        student = UNet2DConditionModel.from_pretrained(args.student)
        teacher = FrozenTeacher(pipeline.unet)
        batches = offline_batches(pipeline, args.batches, args.batch_size)
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    results = pair_terms(student.eval(), teacher, batches, scheduler)
    print(json.dumps(results, indent=1) if args.json else table(results))
    return results


if __name__ == "__main__":
    main()
