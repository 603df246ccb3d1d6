"""What the cache builder does to one row and one shard: check and preprocess the row (in a
DataLoader worker), run the VAE on a batch, collect a shard. No file handling (`shards.py`), no
orchestration (`build.py`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from distill.data.metadata import as_text
from distill.data.preprocess import PreprocessSpec, crop_box, preprocess_image
from distill.data.shards import CAPTION_PREFIX, SAMPLE_PREFIX, SKIP_REASONS


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


def crop_generator(spec: PreprocessSpec, source_index: int) -> torch.Generator | None:
    """A random crop is seeded by the row index: reproducible, and the same for both flips."""
    return None if spec.center_crop else torch.Generator().manual_seed(source_index)


def image_variants(image: Image.Image, spec: PreprocessSpec, source_index: int) -> torch.Tensor:
    """(V, 3, R, R) pixels in [-1, 1]: the image, then its mirror image when `spec.random_flip`
    (the same square, mirrored)."""
    variants = [
        preprocess_image(image, spec, flip=flip, generator=crop_generator(spec, source_index))
        for flip in flip_variants(spec.random_flip)
    ]
    return torch.stack(variants)


def crop_geometry(
    image: Image.Image, spec: PreprocessSpec, source_index: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((original height, width), (crop top, left) in resized pixels): SDXL's size ids. With
    `spec.size_ids == "target"` the original size is the output's (see `PreprocessSpec`)."""
    width, height = image.size
    side = min(width, height)
    top, left = crop_box(
        height, width, side, center=spec.center_crop, generator=crop_generator(spec, source_index)
    )
    scale = spec.resolution / side
    original = (height, width) if spec.size_ids == "original" else (spec.resolution,) * 2
    return original, (round(top * scale), round(left * scale))


@torch.no_grad()
def encode_latent_distribution(
    vae: torch.nn.Module, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels (B, 3, R, R) in [-1, 1] → (mean, logvar), each (B, C, h, w): the VAE posterior
    N(mean, exp(logvar)) before the latent scaling factor (`AutoencoderKL.encode(x).latent_dist`,
    whose std is exp(logvar / 2))."""
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean, posterior.logvar


@dataclass(frozen=True)
class PreparedRow:
    """One source row, checked and preprocessed (in a DataLoader worker): the pixels of its
    variants and its caption, or the reason it is skipped."""

    source_index: int
    pixels: torch.Tensor | None  # (V, 3, R, R)
    caption: str | None
    problem: str | None = None  # a SKIP_REASONS entry
    error: str = ""  # what the image decoder said, for the first warnings
    original_size: tuple[int, int] = (0, 0)  # (height, width) before preprocessing
    crop_top_left: tuple[int, int] = (0, 0)  # where the square crop sat, in resized pixels


def prepare_row(source_index: int, row: dict[str, Any], spec: PreprocessSpec) -> PreparedRow:
    caption = as_text(row.get("text"))  # a number or a list is text too; None stays None
    problem = row_problem(row.get("image"), caption)
    if problem is not None:
        return PreparedRow(source_index, None, None, problem)
    try:
        image = decode_image(row.get("image"))
        pixels = image_variants(image, spec, source_index)
        original_size, crop_top_left = crop_geometry(image, spec, source_index)
    # PIL signals a bad file with OSError, SyntaxError, ValueError, struct.error or
    # DecompressionBombError depending on the format: any of them means "skip this row".
    except Exception as error:
        return PreparedRow(source_index, None, None, "unreadable_image", repr(error))
    return PreparedRow(source_index, pixels, caption, None, "", original_size, crop_top_left)


class PreparedRows(torch.utils.data.Dataset):
    """Rows [start, stop) of a map-style dataset (images not decoded), prepared one by one, so a
    DataLoader's workers decode and resize while the main process runs the VAE."""

    def __init__(self, rows: Any, start: int, stop: int, spec: PreprocessSpec) -> None:
        self.rows, self.start, self.stop, self.spec = rows, start, stop, spec

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, offset: int) -> PreparedRow:
        index = self.start + offset
        return prepare_row(index, self.rows[index], self.spec)


def keep_rows(batch: list[PreparedRow]) -> list[PreparedRow]:
    """DataLoader collate: the prepared rows as they are (pixels differ in nothing but are
    stacked later, with the usable rows only)."""
    return batch


@dataclass
class ShardBuffer:
    """Encoded samples (on CPU) of one shard, waiting to be written."""

    means: list[torch.Tensor] = field(default_factory=list)  # each (B, V, C, h, w)
    logvars: list[torch.Tensor] = field(default_factory=list)
    source_indices: list[int] = field(default_factory=list)
    text_slots: list[int] = field(default_factory=list)
    captions: dict[str, int] = field(default_factory=dict)  # caption -> slot, in first-seen order
    sample_fields: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> (…)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def __len__(self) -> int:
        return len(self.source_indices)

    def add(
        self,
        rows: list[PreparedRow],
        means: torch.Tensor,
        logvars: torch.Tensor,
        sample_fields: list[dict[str, torch.Tensor]],
    ) -> None:
        """Usable rows with their encoded posteriors (B, V, C, h, w) and per-image fields (the
        conditioning's, e.g. SDXL's size ids), in row order."""
        self.means.append(means)
        self.logvars.append(logvars)
        for row, fields in zip(rows, sample_fields, strict=True):
            self.source_indices.append(row.source_index)
            self.text_slots.append(self.captions.setdefault(row.caption, len(self.captions)))
            for name, value in fields.items():
                self.sample_fields.setdefault(name, []).append(value)

    def tensors(self, caption_fields: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
        """The shard's tensors; `caption_fields` holds one row per caption, in slot order.

        An empty shard (every row skipped) still has well-formed tensors: it records the skips.
        """
        if not self.means:
            return {"source_index": torch.zeros(0, dtype=torch.int64)}
        tensors = {
            "latent_mean": torch.cat(self.means).to(dtype),
            "latent_logvar": torch.cat(self.logvars).to(dtype),
            "text_slot": torch.tensor(self.text_slots, dtype=torch.int32),
            "source_index": torch.tensor(self.source_indices, dtype=torch.int64),
        }
        samples = {f"{SAMPLE_PREFIX}{k}": torch.stack(v) for k, v in self.sample_fields.items()}
        return tensors | samples | {f"{CAPTION_PREFIX}{k}": v for k, v in caption_fields.items()}
