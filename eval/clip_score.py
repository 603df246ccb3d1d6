"""CLIP score: how well each image matches its prompt, by torchmetrics' `CLIPScore`.

Scale: the mean cosine similarity between CLIP image and text embeddings, on the 0–1 scale BK-SDM
reports (SD v1.4: 0.2958 with open_clip ViT-g-14 `laion2b_s34b_b88k` on COCO-30K). torchmetrics
reports 100 × cosine (and clamps the mean at 0); we divide by 100.

The CLIP model is a spec:
  - a transformers hub id or local folder, e.g. `openai/clip-vit-large-patch14`;
  - `open_clip:NAME[:PRETRAINED]`, e.g. `open_clip:ViT-g-14:laion2b_s34b_b88k` (BK-SDM's); without
    PRETRAINED the model's first published tag is used.
No CLIP weights ship offline: when none can be loaded the result is "unavailable: <reason>".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from core.errors import UserInputError
from eval.image_io import open_rgb, to_uint8_tensor
from eval.results import MetricResult, MetricUnavailable

OPEN_CLIP_PREFIX = "open_clip:"
TORCHMETRICS_SCALE = 100.0  # torchmetrics' CLIPScore = 100 × cosine similarity


@dataclass
class ClipBackend:
    """A CLIP model and processor in the shape torchmetrics' `CLIPScore` calls them:
    `model.get_image_features(pixel_values) -> (B, E)`, `model.get_text_features(input_ids,
    attention_mask) -> (B, E)`, `processor(images=[(3, H, W) uint8] | text=[str], ...) -> dict`."""

    model: nn.Module
    processor: Callable[..., dict[str, torch.Tensor]]
    name: str


class _TransformersCLIPFeatures(nn.Module):
    """transformers ≥ 5 (here 5.23): `CLIPModel.get_image_features` / `get_text_features` return a
    `BaseModelOutputWithPooling` whose `pooler_output` holds the projected (B, E) embeddings;
    torchmetrics 1.9's `CLIPScore` expects the tensor itself (it calls `.norm` on the result).
    This wrapper hands it the tensor; everything else is the unmodified torchmetrics metric."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip = clip_model.eval()
        self.config = clip_model.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _embedding(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        output = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _embedding(output)


def _embedding(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _OpenClipFeatures(nn.Module):
    """An open_clip model behind the two methods torchmetrics calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        # torchmetrics truncates captions to `config.text_config.max_position_embeddings` when that
        # exists; open_clip's tokenizer already truncates to its context length.
        self.config = SimpleNamespace()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class _OpenClipProcessor:
    """open_clip's image transform and tokenizer behind torchmetrics' CLIPProcessor calls."""

    def __init__(
        self, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Callable
    ) -> None:
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(
        self,
        images: Sequence[torch.Tensor] | None = None,
        text: Sequence[str] | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        if images is not None:
            pil = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]
            return {"pixel_values": torch.stack([self.preprocess(image) for image in pil])}
        tokens = self.tokenizer(list(text or []))  # (B, context_length) int64, already truncated
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def transformers_backend(clip_model: nn.Module, processor: Callable, name: str) -> ClipBackend:
    """Wrap a `transformers.CLIPModel` and `CLIPProcessor` for torchmetrics."""
    return ClipBackend(_TransformersCLIPFeatures(clip_model), processor, name)


def open_clip_backend(
    model: nn.Module, preprocess: Callable, tokenizer: Callable, name: str
) -> ClipBackend:
    """Wrap an open_clip model, its inference transform and tokenizer for torchmetrics."""
    return ClipBackend(_OpenClipFeatures(model), _OpenClipProcessor(preprocess, tokenizer), name)


def load_clip_backend(spec: str, device: str | torch.device = "cpu") -> ClipBackend:
    """Load the CLIP model named by `spec` (see module docstring). Raises MetricUnavailable when the
    weights cannot be loaded (offline, unknown id), UserInputError when the spec is malformed."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(spec.removeprefix(OPEN_CLIP_PREFIX), device)
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(spec, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise MetricUnavailable(
            f"cannot load CLIP model {spec!r} ({_first_line(error)})"
        ) from error
    return transformers_backend(model.to(device), processor, spec)


def _load_open_clip(name_and_tag: str, device: str | torch.device) -> ClipBackend:
    import open_clip

    name, _, pretrained = name_and_tag.partition(":")
    if name not in open_clip.list_models():
        raise UserInputError(f"unknown open_clip model {name!r} in CLIP spec")
    tags = open_clip.list_pretrained_tags_by_model(name)
    pretrained = pretrained or (tags[0] if tags else "")
    if not pretrained:
        raise UserInputError(f"open_clip model {name!r} has no published weights; name a file")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True
        )
    except (OSError, RuntimeError, ValueError) as error:
        reason = f"cannot load open_clip {name}:{pretrained} ({_first_line(error)})"
        raise MetricUnavailable(reason) from error
    return open_clip_backend(
        model, preprocess, open_clip.get_tokenizer(name), f"{name}:{pretrained}"
    )


def clip_score(
    images: Sequence[str | Path | Image.Image],
    prompts: Sequence[str],
    clip_model: str | ClipBackend | None,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> MetricResult:
    """Mean CLIP cosine similarity (0–1 scale) of `images[i]` with `prompts[i]`.

    `clip_model` is a spec string (module docstring), a loaded `ClipBackend`, or None; when no model
    can be loaded the result is unavailable, with the reason.
    """
    if len(images) != len(prompts):
        raise UserInputError(
            f"CLIP score needs one prompt per image: {len(images)} vs {len(prompts)}"
        )
    if not images:
        raise UserInputError("CLIP score needs at least one image")
    if clip_model is None:
        return MetricResult.missing(
            "no CLIP model given",
            detail="pass a transformers hub id or folder, or open_clip:NAME[:PRETRAINED]",
        )
    try:
        backend = (
            clip_model
            if isinstance(clip_model, ClipBackend)
            else load_clip_backend(clip_model, device)
        )
    except MetricUnavailable as reason:
        return MetricResult.missing(str(reason))

    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (backend.model, backend.processor))
    bar = tqdm(total=len(images), desc="CLIP score", unit="img", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            tensors = [to_uint8_tensor(open_rgb(image)).to(device) for image in chunk]  # (3, H, W)
            metric.update(tensors, list(prompts[start : start + batch_size]))
            bar.update(len(chunk))
    bar.close()
    value = float(metric.compute()) / TORCHMETRICS_SCALE
    return MetricResult(
        value=value, n=len(images), detail=f"CLIP {backend.name}, mean cosine similarity (0-1)"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
