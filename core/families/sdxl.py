"""SDXL: `StableDiffusionXLPipeline`, two text encoders, a pooled text embedding, size ids.

As `StableDiffusionXLPipeline.encode_prompt` and diffusers' SDXL training script do it:

    encoder_hidden_states = cat(penultimate hidden states of text_encoder (CLIP ViT-L),
                                penultimate hidden states of text_encoder_2 (OpenCLIP bigG))
                            (B, 77, 768 + 1280)
    text_embeds = text_encoder_2's projected pooled output             (B, 1280)
    time_ids    = (original height, width, crop top, left, target height, width)   (B, 6)

The cache stores both token-id fields per caption and the six size ids per image (they come
from the preprocessing: the original size and where the square crop sat, in resized pixels).
Dropping a caption for classifier-free guidance swaps its ids for those of "" (and so its pooled
embedding); the size ids stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from torch import Tensor

from core.families.base import Conditioning, ModelFamily
from core.families.sd import text_probe_inputs, token_fields
from core.identity import tokenizer_identity

TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


class SDXLConditioning(Conditioning):
    def __init__(
        self,
        tokenizers: tuple[Any, Any],
        text_encoders: tuple[torch.nn.Module, torch.nn.Module] | None = None,
    ) -> None:
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders

    def identity(self) -> dict[str, Any]:
        return {"tokenizers": [tokenizer_identity(t) for t in self.tokenizers], "family": "sdxl"}

    def caption_fields(self, captions: list[str]) -> dict[str, Tensor]:
        first = token_fields(self.tokenizers[0], captions)
        second = token_fields(self.tokenizers[1], captions, suffix="_2")
        return {"input_ids": first["input_ids"], "input_ids_2": second["input_ids_2"]}

    def sample_fields(
        self, original_size: tuple[int, int], crop_top_left: tuple[int, int], size: int
    ) -> dict[str, Tensor]:
        ids = (*original_size, *crop_top_left, size, size)
        return {"time_ids": torch.tensor(ids, dtype=torch.float32)}

    @torch.no_grad()
    def encode(self, fields: Mapping[str, Tensor]) -> dict[str, Any]:
        if self.text_encoders is None:
            raise ValueError("this conditioning has no text encoders (it was built for a cache)")
        first, second = self.text_encoders
        device = next(first.parameters()).device
        ids = fields["input_ids"].to(device, torch.long)
        ids_2 = fields["input_ids_2"].to(device, torch.long)
        hidden = first(ids, output_hidden_states=True).hidden_states[-2]  # (B, L, 768)
        output = second(ids_2, output_hidden_states=True)
        hidden_2 = output.hidden_states[-2]  # (B, L, 1280)
        dtype = hidden_2.dtype
        return {
            "encoder_hidden_states": torch.cat([hidden.to(dtype), hidden_2], dim=-1),
            "added_cond_kwargs": {
                "text_embeds": output.text_embeds,  # (B, 1280) projected pooled output
                "time_ids": fields["time_ids"].to(device, dtype),
            },
        }


class StableDiffusionXL(ModelFamily):
    name: ClassVar[str] = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_projections: ClassVar[tuple[bool, ...]] = (False, True)

    def handles(self, pipeline_class: str | None, unet_config: Mapping[str, Any]) -> bool:
        if pipeline_class is not None:
            return pipeline_class == StableDiffusionXLPipeline.__name__
        return unet_config.get("addition_embed_type") == "text_time"

    def conditioning(self, pipeline: DiffusionPipeline, *, encoders: bool) -> SDXLConditioning:
        tokenizers = (pipeline.tokenizer, pipeline.tokenizer_2)
        text_encoders = (pipeline.text_encoder, pipeline.text_encoder_2) if encoders else None
        return SDXLConditioning(tokenizers, text_encoders)

    def assemble(self, *, vae, unet, scheduler, text_encoders, tokenizers):
        (text_encoder, text_encoder_2), (tokenizer, tokenizer_2) = text_encoders, tokenizers
        # Training drops a caption to the ids of "" (as diffusers' SDXL training script does), so
        # guidance must encode "" too, not the zero embedding SDXL base's pipeline defaults to.
        return self.pipeline_class(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=False,
        )

    def with_parts(self, pipeline, parts):
        components = {**pipeline.components, **parts}
        zeros = pipeline.config.force_zeros_for_empty_prompt  # a pipeline setting, not a part
        return self.pipeline_class(**components, force_zeros_for_empty_prompt=zeros)

    def unet_conditioning_config(self, text_widths, embedding_width):
        # Cross-attention reads both encoders' states side by side; the added embedding reads
        # the second's projected pooled output beside the six Fourier-embedded size ids.
        return {
            "cross_attention_dim": sum(text_widths),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": embedding_width,
            "projection_class_embeddings_input_dim": text_widths[-1] + TIME_IDS * embedding_width,
        }

    def probe_inputs(
        self, config, *, batch_size=1, sample_size=None, device="cpu", dtype=torch.float32
    ):
        inputs = text_probe_inputs(
            config, batch_size=batch_size, sample_size=sample_size, device=device, dtype=dtype
        )
        pooled = (
            config["projection_class_embeddings_input_dim"]
            - TIME_IDS * config["addition_time_embed_dim"]
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch_size, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch_size, TIME_IDS, device=device, dtype=dtype),
        }
        return inputs
