"""Tiny, seeded, real models for the eval tests: a StableDiffusionPipeline, a CLIP model and a
Fashion-MNIST classifier.

Everything is built in-process (no hub) from the offline world's components
(`offline.tiny_models`): (32, 64) UNets at 32 px, the real CLIP BPE tokenizer derived
offline, random weights from fixed seeds. The classifier is really trained, on the first 10,000
training images for one epoch (about 9 s; 80.7% test accuracy, 87.7% with all 60,000). The
cache (tokenizer files, converted FID Inception, reference statistics, the classifier) lives in
one temporary folder per test session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from eval.clip_score import ClipBackend, transformers_backend
from offline.tiny_models import sampling_scheduler, tiny_text_encoder, tiny_unet, tiny_vae
from offline.tokenizer import build_clip_tokenizer

TINY_SIZE = 32  # pixels; latents 8x8 with the 4x VAE below


@pytest.fixture
def empty_torch_hub(tmp_path: Path) -> Iterator[None]:
    """An empty torch hub dir: torch-fidelity's weights are certainly not cached there."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield
    torch.hub.set_dir(previous)


@pytest.fixture(scope="session")
def clip_tokenizer(cache_dir: Path):
    return build_clip_tokenizer(cache_dir=str(cache_dir))


def tiny_pipeline(tokenizer, seed: int = 0, layers_per_block: int = 1) -> StableDiffusionPipeline:
    """SD v1's pipeline in miniature (offline-world components), random weights from `seed`."""
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=tiny_vae(block_out_channels=(16, 32, 32), image_size=TINY_SIZE),
        text_encoder=tiny_text_encoder(seed=seed, hidden_size=32),
        tokenizer=tokenizer,
        unet=tiny_unet(block_out_channels=(32, 64), layers_per_block=layers_per_block),
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture
def teacher_pipeline(clip_tokenizer) -> StableDiffusionPipeline:
    return tiny_pipeline(clip_tokenizer, seed=0, layers_per_block=2)


@pytest.fixture
def student_pipeline(clip_tokenizer) -> StableDiffusionPipeline:
    return tiny_pipeline(clip_tokenizer, seed=1, layers_per_block=1)


@pytest.fixture
def tiny_clip(clip_tokenizer) -> ClipBackend:
    """A random CLIPModel (seeded) with the real CLIP tokenizer and a 32 px image processor."""
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(clip_tokenizer), "max_position_embeddings": 77},
        vision_config={**tower, "image_size": TINY_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_SIZE}, crop_size={"height": TINY_SIZE, "width": TINY_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer)
    return transformers_backend(CLIPModel(config).eval(), processor, "tiny-random-clip")


@pytest.fixture
def direct_cosines():
    """`direct_cosines(backend, images, prompts)` -> (N,) cosine(image i, prompt i), computed
    straight from the transformers CLIPModel, outside torchmetrics and our wrapper."""

    def compute(backend: ClipBackend, images, prompts) -> torch.Tensor:
        clip, processor = backend.model.clip, backend.processor
        with torch.no_grad():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            text = processor(text=list(prompts), return_tensors="pt", padding=True)
            image_embeds = clip.get_image_features(pixel_values=pixels).pooler_output
            text_embeds = clip.get_text_features(**text).pooler_output
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)

    return compute
