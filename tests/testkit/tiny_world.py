"""A tiny Stable Diffusion world for engine tests: two teacher pipelines and a caption dataset.

The teachers are real `StableDiffusionPipeline` folders (random weights, seeded) with SD v1's
layout in miniature, so the engine consumes them exactly as it would SD v1.4 and v1.5.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from offline.tiny_models import tiny_text_encoder, tiny_unet, tiny_vae
from offline.tokenizer import build_clip_tokenizer


def make_tiny_pipeline(folder: Path, seed: int, text_encoder_seed: int = 0) -> Path:
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(block_out_channels=(8, 16, 16), norm_num_groups=8),
        text_encoder=tiny_text_encoder(seed=text_encoder_seed, hidden_size=16, num_hidden_layers=1),
        tokenizer=build_clip_tokenizer(),
        unet=tiny_unet(cross_attention_dim=16, block_out_channels=(8, 16, 16), norm_num_groups=8),
        scheduler=PNDMScheduler(  # SD v1.4's scheduler_config.json
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Teachers a and b share the VAE and text encoder (as SD v1.4 and v1.5 do): same seed for
    # those, different UNets.
    if seed != 0:
        torch.manual_seed(0)
        pipeline.vae.load_state_dict(tiny_vae(block_out_channels=(8, 16, 16)).state_dict())
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_recipe(tmp_path: Path, teachers: dict[str, Path], **training) -> dict:
    """Three short stages in the small-stable-diffusion-v0 pattern."""
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "seed": 7,
        "teachers": {key: str(path) for key, path in teachers.items()},
        "student": {"variant": "base", "init_from": "a"},
        "data": {
            "source": "fashion-mnist",
            "max_samples": 12,
            "resolution": 32,
            "random_flip": True,
            "cache_dir": str(tmp_path / "cache"),
            "encode_batch_size": 12,
            "encode_workers": 0,  # 12 rows: a worker process would cost more than it saves
        },
        "training": {
            "checkpoint_every": 2,
            "keep_last": 2,
            "log_every": 1,
            "data_workers": 0,  # 4-sample batches: a worker process costs more than it saves
            # fp32 on every CPU ("auto" would be bf16 on some CPUs only): recorded values hold.
            "mixed_precision": "no",
            "ema": {"enabled": True, "decay": 0.9},
            **training,
        },
        "stages": [
            {"name": "denoise", "steps": 3, "batch_size": 4, "lr": 1e-3},
            {
                "name": "soft_labels",
                "teacher": "a",
                "steps": 3,
                "batch_size": 4,
                "gradient_accumulation": 2,
                "lr": 1e-3,
                "losses": {"task": {"weight": 1.0}, "output_kd": {"weight": 1.0}},
            },
            {
                "name": "layer_matching",
                "teacher": "b",
                "steps": 3,
                "batch_size": 4,
                "lr": 1e-3,
                "lr_schedule": "cosine",
                "warmup_steps": 1,
                "losses": {
                    "task": {"weight": 1.0},
                    "output_kd": {"weight": 1.0},
                    "similarity": {"weight": 1.0},
                },
            },
        ],
    }


def recorded_recipe(tmp_path: Path, teachers: dict[str, Path]) -> dict:
    """The seeded run whose logged terms `tests/distill/recorded/tiny_run_terms.json` holds:
    `tiny_recipe`'s three stages, then a BK-SDM-style stage with feature KD, with validation grids.

    A float64 reference run (`distill.precision`) with a float32 cache: in fp32 the same run
    drifted by up to 0.3% between two CPUs of one kind; in float64 kernel rounding stays near
    1e-15, and the float32 cache of float64 encodings rounds alike on every machine.
    """
    raw = tiny_recipe(
        tmp_path,
        teachers,
        validation_prompts=["a photo of a bag"],
        validation_steps=2,
        dtype="float64",
    )
    raw["data"]["cache_dtype"] = "float32"
    raw["stages"].append(
        {
            "name": "bk_sdm",
            "teacher": "a",
            "steps": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "losses": {
                "task": {"weight": 1.0},
                "output_kd": {"weight": 1.0},
                "feature_kd": {"weight": 0.5},
            },
        }
    )
    return raw


# A `kind: teacher` recipe at toy size (seconds): `distill run RECIPE output_dir=... *these`.
TOY_TEACHER_OVERRIDES = [
    "train.vae_steps=2",
    "train.unet_steps=4",
    "train.batch_size=4",
    "train.vae_batch_size=4",
    "train.vae_channels=[8, 16, 16]",
    "train.unet_channels=[16, 32, 32]",
    "train.max_train_samples=64",
    "train.grid_seeds=[0]",
    "train.grid_inference_steps=2",
]
