"""Prompt conditioning in two halves: token ids for the cache, the text encoder in the step.

The latent cache stores each caption's token ids (77 int32 = 308 B) instead of the text encoder's
hidden states (77 × 768 fp32 = 236 KB in SD v1), and the step runs the frozen text encoder on
the batch: about 1% of a step's FLOPs at SD scale (CLIP ViT-L's text tower is 123M parameters
against the UNets' 1.4B), for a cache about half the size (`benchmarks/encode_throughput.py`).
It also makes one cache serve every teacher that shares a tokenizer (SD v1.4 and v1.5).

    fields = conditioning.caption_fields(["a photo of a cat"])   # {"input_ids": (1, 77) int32}
    unet_inputs = conditioning.encode(fields)                  # {"encoder_hidden_states": ...}

This is SD 1.x/2.x's conditioning (one CLIP text encoder, `last_hidden_state`). A model family
with other conditioning (SDXL: two encoders, a pooled embedding, size ids) provides the same two
methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from distill.data.fingerprint import tokenizer_identity


class TextConditioning:
    """One CLIP text encoder, as `StableDiffusionPipeline.encode_prompt` uses it: captions padded
    and truncated to `model_max_length`; an attention mask only when the encoder's config asks
    for one (`use_attention_mask`): SD v1 conditions on the padded positions too."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.uses_mask = bool(
            text_encoder is not None and getattr(text_encoder.config, "use_attention_mask", False)
        )

    def identity(self) -> dict[str, Any]:
        """What decides the cached fields (the cache key's part): the tokenizer, and the mask."""
        return {"tokenizer": tokenizer_identity(self.tokenizer), "mask": self.uses_mask}

    def caption_fields(self, captions: list[str]) -> dict[str, Tensor]:
        """captions → {"input_ids": (K, L) int32[, "attention_mask": (K, L) int32]} on CPU."""
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        fields = {"input_ids": tokens.input_ids.to(torch.int32)}
        if self.uses_mask:
            fields["attention_mask"] = tokens.attention_mask.to(torch.int32)
        return fields

    @torch.no_grad()
    def encode(self, fields: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Token fields (B, L) → the UNet's text input {"encoder_hidden_states": (B, L, D)}, on
        the text encoder's device; frozen (no grad), in its own dtype."""
        if self.text_encoder is None:
            raise ValueError("this TextConditioning has no text encoder (it was built for a cache)")
        device = next(self.text_encoder.parameters()).device
        extra = {}
        if self.uses_mask:
            extra["attention_mask"] = fields["attention_mask"].to(device, torch.long)
        ids = fields["input_ids"].to(device, torch.long)
        return {"encoder_hidden_states": self.text_encoder(ids, **extra).last_hidden_state}


def encode_captions(text_encoder: torch.nn.Module, tokenizer: Any, captions: list[str]) -> Tensor:
    """captions → (B, L, D) hidden states, as a pipeline conditions on them (no cache)."""
    conditioning = TextConditioning(tokenizer, text_encoder)
    return conditioning.encode(conditioning.caption_fields(captions))["encoder_hidden_states"]
