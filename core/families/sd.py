"""SD 1.x and 2.x: `StableDiffusionPipeline`, one CLIP text encoder's `last_hidden_state`.

SD 2.x needs nothing of its own here: its OpenCLIP text tower is a `CLIPTextModel` in diffusers,
and its v-prediction is the scheduler's `prediction_type`, which the task target follows.

The latent cache stores each caption's token ids (77 int32 = 308 B) instead of the text
encoder's hidden states (77 × 768 fp32 = 236 KB in SD v1), and the step runs the frozen text
encoder on the batch: about 1% of a step's FLOPs at SD scale (CLIP ViT-L's text tower is 123M
parameters against the UNets' 1.4B), for a cache about half the size. One cache then serves
every teacher that shares a tokenizer (SD v1.4 and v1.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import Tensor

from core.families.base import Conditioning, ModelFamily
from core.identity import tokenizer_identity


def token_fields(tokenizer: Any, captions: list[str], suffix: str = "") -> dict[str, Tensor]:
    """Token ids (K, L) int32 as the pipelines tokenize: padded and truncated to max length."""
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return {
        f"input_ids{suffix}": tokens.input_ids.to(torch.int32),
        f"attention_mask{suffix}": tokens.attention_mask.to(torch.int32),
    }


class TextConditioning(Conditioning):
    """One CLIP text encoder, as `StableDiffusionPipeline.encode_prompt` uses it: an attention
    mask only when the encoder's config asks for one (`use_attention_mask`): SD v1 conditions on
    the padded positions too."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module | None = None) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.uses_mask = bool(
            text_encoder is not None and getattr(text_encoder.config, "use_attention_mask", False)
        )

    def identity(self) -> dict[str, Any]:
        return {"tokenizer": tokenizer_identity(self.tokenizer), "mask": self.uses_mask}

    def caption_fields(self, captions: list[str]) -> dict[str, Tensor]:
        fields = token_fields(self.tokenizer, captions)
        if not self.uses_mask:
            del fields["attention_mask"]
        return fields

    @torch.no_grad()
    def encode(self, fields: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.text_encoder is None:
            raise ValueError("this conditioning has no text encoder (it was built for a cache)")
        device = next(self.text_encoder.parameters()).device
        extra = {}
        if self.uses_mask:
            extra["attention_mask"] = fields["attention_mask"].to(device, torch.long)
        ids = fields["input_ids"].to(device, torch.long)
        return {"encoder_hidden_states": self.text_encoder(ids, **extra).last_hidden_state}


TEXT_SEQUENCE_LENGTH = 77  # CLIP's context length, the encoder_hidden_states length in SD


def text_probe_inputs(
    config: Mapping[str, Any],
    *,
    batch_size: int,
    sample_size: int | None,
    device: str | torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """A UNet forward's inputs when it reads CLIP text states: latents, timesteps and
    `encoder_hidden_states` (B, 77, cross_attention_dim)."""
    size = sample_size or config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    width = config["cross_attention_dim"]
    width = width if isinstance(width, int) else width[0]
    place = {"device": device, "dtype": dtype}
    return {
        "sample": torch.randn(batch_size, config["in_channels"], size, size, **place),
        "timestep": torch.full((batch_size,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch_size, TEXT_SEQUENCE_LENGTH, width, **place),
    }


class StableDiffusion(ModelFamily):
    name: ClassVar[str] = "sd"
    pipeline_class = StableDiffusionPipeline
    text_encoder_projections: ClassVar[tuple[bool, ...]] = (False,)
    # No safety checker: its black-out would bias FID (BK-SDM disables it for benchmarks too)
    # and means nothing for a training teacher.
    pipeline_kwargs: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "requires_safety_checker": False,
    }

    def handles(self, pipeline_class: str | None, unet_config: Mapping[str, Any]) -> bool:
        if pipeline_class is not None:
            return pipeline_class == StableDiffusionPipeline.__name__
        return unet_config.get("addition_embed_type") is None

    def conditioning(self, pipeline: DiffusionPipeline, *, encoders: bool) -> TextConditioning:
        return TextConditioning(pipeline.tokenizer, pipeline.text_encoder if encoders else None)

    def assemble(self, *, vae, unet, scheduler, text_encoders, tokenizers):
        (text_encoder,), (tokenizer,) = text_encoders, tokenizers
        return self.pipeline_class(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            feature_extractor=None,
            **self.pipeline_kwargs,
        )

    def unet_conditioning_config(self, text_widths, embedding_width):
        (width,) = text_widths
        return {"cross_attention_dim": width}

    def probe_inputs(
        self, config, *, batch_size=1, sample_size=None, device="cpu", dtype=torch.float32
    ):
        return text_probe_inputs(
            config, batch_size=batch_size, sample_size=sample_size, device=device, dtype=dtype
        )

    def with_parts(self, pipeline, parts):
        components = {k: v for k, v in pipeline.components.items() if k != "safety_checker"}
        return self.pipeline_class(**{**components, **parts}, **self.pipeline_kwargs)


def encode_captions(text_encoder: torch.nn.Module, tokenizer: Any, captions: list[str]) -> Tensor:
    """captions → (B, L, D) hidden states, as an SD pipeline conditions on them (no cache)."""
    conditioning = TextConditioning(tokenizer, text_encoder)
    return conditioning.encode(conditioning.caption_fields(captions))["encoder_hidden_states"]
