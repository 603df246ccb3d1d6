"""What differs between Stable Diffusion families, behind one interface.

A family owns: which pipeline class a teacher is (and how to load it and put another UNet in it),
how prompts become the UNet's conditioning (`Conditioning`: token fields for the latent cache,
the frozen text encoders in the training step), and what one UNet forward needs as inputs. The
cache, the step, the trainer, validation, evaluation and export carry the conditioning as a dict
and call `unet(x, t, **conditioning)`, so adding a family is one module here.

Families: `sd` (SD 1.x and 2.x, `StableDiffusionPipeline`; 2.x's v-prediction is its scheduler's
`prediction_type`, which the task target follows) and `sdxl` (`StableDiffusionXLPipeline`: two
text encoders, a pooled text embedding, size and crop ids).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from core.errors import UserInputError


class Conditioning(ABC):
    """Prompts to UNet inputs, split at the cache: `caption_fields` (token ids, stored once per
    caption) and `sample_fields` (per image, e.g. SDXL's size ids) are what the cache keeps;
    `encode` runs the frozen text encoders on a batch of them in the step."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What decides the cached fields (part of the cache key): the tokenizers."""

    @abstractmethod
    def caption_fields(self, captions: list[str]) -> dict[str, Tensor]:
        """captions → named (K, L) int32 tensors, on CPU."""

    def sample_fields(
        self, original_size: tuple[int, int], crop_top_left: tuple[int, int], size: int
    ) -> dict[str, Tensor]:
        """Per-image fields from the preprocessing (none for SD 1.x/2.x)."""
        return {}

    @abstractmethod
    def encode(self, fields: Mapping[str, Tensor]) -> dict[str, Any]:
        """A batch of fields → the UNet's keyword inputs (no grad, on the encoders' device)."""


class ModelFamily(ABC):
    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}  # extra from_pretrained / init arguments
    # One entry per text encoder, in the family's order: whether it is a text model with a
    # projection (CLIPTextModelWithProjection), whose projected pooled output the UNet reads.
    text_encoder_projections: ClassVar[tuple[bool, ...]]

    @abstractmethod
    def handles(self, pipeline_class: str | None, unet_config: Mapping[str, Any]) -> bool:
        """Whether a teacher with this pipeline class name (None: a bare UNet) is this family."""

    @abstractmethod
    def conditioning(self, pipeline: DiffusionPipeline, *, encoders: bool) -> Conditioning:
        """The pipeline's conditioning; `encoders=False` (the cache) needs only tokenizers."""

    def load_pipeline(self, location: str, dtype: torch.dtype | None = None) -> DiffusionPipeline:
        """The pipeline at a local folder or hub id, safetensors only; bad input is one line."""
        try:
            return self.pipeline_class.from_pretrained(
                location, dtype=dtype, use_safetensors=True, **self.pipeline_kwargs
            )
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserInputError(
                f"cannot load a {self.pipeline_class.__name__} from {location!r}: {first_line}"
            ) from None

    @abstractmethod
    def assemble(
        self,
        *,
        vae: torch.nn.Module,
        unet: UNet2DConditionModel,
        scheduler: Any,
        text_encoders: tuple[torch.nn.Module, ...],
        tokenizers: tuple[Any, ...],
    ) -> DiffusionPipeline:
        """A pipeline of this family from parts (the offline world builds its teachers so): as
        many text encoders and tokenizers as the family has, in its order."""

    def with_parts(
        self, pipeline: DiffusionPipeline, parts: Mapping[str, Any]
    ) -> DiffusionPipeline:
        """The same pipeline with `parts` (component name -> module, e.g. a student "unet", a
        trained "vae", a "scheduler") in place of its own; the others are shared, not copied."""
        components = {**pipeline.components, **parts}
        return self.pipeline_class(**components, **self.pipeline_kwargs)

    def with_unet(
        self, pipeline: DiffusionPipeline, unet: UNet2DConditionModel
    ) -> DiffusionPipeline:
        """The same pipeline around another UNet (the student)."""
        return self.with_parts(pipeline, {"unet": unet})

    @abstractmethod
    def unet_conditioning_config(
        self, text_widths: tuple[int, ...], embedding_width: int
    ) -> dict[str, Any]:
        """The UNet config entries that make a UNet read this family's conditioning, for text
        encoders of these hidden widths (family order; a projected one's projection width is its
        hidden width) and, where the family embeds extra ids (SDXL's sizes), `embedding_width`
        per id. For building a UNet from scratch (the offline world's teachers)."""

    @abstractmethod
    def probe_inputs(
        self,
        config: Mapping[str, Any],
        *,
        batch_size: int = 1,
        sample_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Keyword inputs of the right shapes for one forward of a UNet with this config (random
        values; on "meta", shapes only): for FLOP counts, latency and the loss preflight."""
