"""The teacher-side encoders the cache runs once, and the per-shard buffer that collects their
outputs. Pure model calls; no file handling (that is `shards.py`), no orchestration (`cache.py`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from distill.data.preprocess import PreprocessSpec, preprocess_image
from distill.data.shards import SKIP_REASONS


def decode_image(value: object) -> Image.Image:
    """Open what `datasets` yields for an image column with decoding off (`{"bytes", "path"}`), or
    a PIL image, raw bytes, a file path, or an (H, W[, C]) uint8 array.

    `load()` forces the full decode here: a truncated JPEG opens fine and only fails on its pixels.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        data = value.get("bytes")
        image = Image.open(io.BytesIO(data) if data is not None else value["path"])
    elif isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str | os.PathLike):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    else:
        raise TypeError(f"not an image: {type(value).__name__}")
    image.load()
    return image


def row_problem(image: object, caption: str | None) -> str | None:
    """Why a row cannot be trained on (a `SKIP_REASONS` entry), or None when its caption is
    usable (the image is checked by decoding it)."""
    if image is None and caption is None:
        return "unreadable_row"  # e.g. a metadata line that is not JSON
    if caption is None:
        return "missing_caption"
    if not caption.strip():
        return "empty_caption"
    return None


def flip_variants(random_flip: bool) -> tuple[bool, ...]:
    """Which variants the cache stores per sample, in storage order: original, then flipped."""
    return (False, True) if random_flip else (False,)


def image_variants(image: Image.Image, spec: PreprocessSpec, source_index: int) -> torch.Tensor:
    """(V, 3, R, R) pixels in [-1, 1]: the image, then its mirror image when `spec.random_flip`.

    A random crop is seeded by the row index, so it is reproducible and both variants show the same
    square (the flipped variant is that square mirrored).
    """
    variants = []
    for flip in flip_variants(spec.random_flip):
        generator = None if spec.center_crop else torch.Generator().manual_seed(source_index)
        variants.append(preprocess_image(image, spec, flip=flip, generator=generator))
    return torch.stack(variants)


@torch.no_grad()
def encode_latent_distribution(
    vae: torch.nn.Module, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels (B, 3, R, R) in [-1, 1] → (mean, std), each (B, C, h, w): the VAE posterior
    N(mean, std²) before the latent scaling factor (`AutoencoderKL.encode(x).latent_dist`)."""
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean, posterior.std


@torch.no_grad()
def encode_captions(text_encoder: torch.nn.Module, tokenizer, captions: list[str]) -> torch.Tensor:
    """captions → (B, L, D) `last_hidden_state`, L = tokenizer.model_max_length (77 for CLIP).

    Tokenized as Stable Diffusion pipelines do (padding to max length, truncation); the attention
    mask is passed only when the encoder's config asks for it (`use_attention_mask`), as in
    diffusers' `StableDiffusionPipeline.encode_prompt`: SD v1 conditions on the padded positions.
    """
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    extra = {}
    if getattr(text_encoder.config, "use_attention_mask", False):
        extra["attention_mask"] = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), **extra).last_hidden_state


@dataclass
class PendingSample:
    """A row that passed the checks, waiting for the next encoder batch."""

    source_index: int
    pixels: torch.Tensor  # (V, 3, R, R)
    caption: str


@dataclass
class ShardBuffer:
    """Encoded samples (on CPU) waiting to be written as one shard starting at `source_start`."""

    source_start: int
    means: list[torch.Tensor] = field(default_factory=list)  # each (B, V, C, h, w)
    stds: list[torch.Tensor] = field(default_factory=list)
    source_indices: list[int] = field(default_factory=list)
    text_slots: list[int] = field(default_factory=list)
    text_rows: list[torch.Tensor] = field(default_factory=list)  # each (K_new, L, D)
    slot_of_caption: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def __len__(self) -> int:
        return len(self.source_indices)

    def unseen_captions(self, captions: list[str]) -> list[str]:
        """Captions this shard has no embedding for yet, de-duplicated, in first-seen order."""
        return list(dict.fromkeys(c for c in captions if c not in self.slot_of_caption))

    def add_captions(self, captions: list[str], embeddings: torch.Tensor) -> None:
        for caption in captions:
            self.slot_of_caption[caption] = len(self.slot_of_caption)
        self.text_rows.append(embeddings)

    def add_samples(
        self, batch: list[PendingSample], means: torch.Tensor, stds: torch.Tensor
    ) -> None:
        self.means.append(means)
        self.stds.append(stds)
        self.source_indices.extend(sample.source_index for sample in batch)
        self.text_slots.extend(self.slot_of_caption[sample.caption] for sample in batch)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "latent_mean": torch.cat(self.means),
            "latent_std": torch.cat(self.stds),
            "text_slot": torch.tensor(self.text_slots, dtype=torch.int64),
            "text_embedding": torch.cat(self.text_rows),
            "source_index": torch.tensor(self.source_indices, dtype=torch.int64),
        }
