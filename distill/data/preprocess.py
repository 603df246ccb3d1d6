"""Image preprocessing for SD training: PIL image → (3, R, R) tensor in [-1, 1].

The same steps as diffusers' `train_text_to_image.py` (resize the shorter side, crop to a square,
optional horizontal flip, scale to [-1, 1]), but bicubic with antialiasing and written as pure
functions so the latent cache can fingerprint exactly what produced its latents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

# Bump when the pixel pipeline below changes: every cache built by the old one becomes stale.
PIPELINE_VERSION = "rgb8/crop-square/resize-bicubic-antialias/flip/to-[-1,1]@2"


@dataclass(frozen=True)
class PreprocessSpec:
    """What turns a source image into model input.

    resolution: side of the square output, in pixels.
    center_crop: crop the middle square; otherwise a random square (seeded, see `crop_box`).
    random_flip: train on horizontal flips too (the cache stores both variants).
    size_ids: the original size SDXL's size ids record: the image's own ("original", SDXL's
        size conditioning), or the output size ("target": data that was upscaled from one
        small size, such as the offline world's 28 px images, sampled at the pipeline's default
        original size = target size).
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    size_ids: Literal["original", "target"] = "original"

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def fingerprint(self) -> str:
        """A short stable hash of the fields and the pipeline version (same spec → same string)."""
        payload = json.dumps({**asdict(self), "pipeline": PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def crop_box(
    height: int, width: int, size: int, *, center: bool, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(top, left) of a size×size crop inside a height×width image: centered, or drawn uniformly
    from `generator` (so a cached random crop is reproducible from its seed)."""
    if center:
        return (height - size) // 2, (width - size) // 2
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left


def preprocess_image(
    image: Image.Image,
    spec: PreprocessSpec,
    *,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PIL image → (3, R, R) float32 in [-1, 1].

    8-bit RGB first (`to_rgb8`), then the largest square is cropped (centered, or placed by
    `generator`), resized to R (bicubic, antialiased), optionally flipped. Cropping before
    resizing is the same picture as diffusers' resize-then-crop, and it keeps extreme shapes
    cheap: a 1×4000 sliver resized first would become 512×2,048,000 pixels. `flip` is an
    argument, not a coin toss, because the cache encodes both variants of the same crop.
    """
    image = to_rgb8(image)
    width, height = image.size
    side = min(width, height)
    top, left = crop_box(height, width, side, center=spec.center_crop, generator=generator)
    image = F.crop(image, top, left, side, side)
    image = F.resize(
        image,
        [spec.resolution, spec.resolution],
        interpolation=InterpolationMode.BICUBIC,
        antialias=True,
    )
    if flip:
        image = F.horizontal_flip(image)
    pixels = F.to_dtype(F.to_image(image), torch.float32, scale=True)  # (3, R, R) in [0, 1]
    return pixels.as_subclass(torch.Tensor) * 2.0 - 1.0


# PIL's integer modes: 16-bit greyscale PNGs load as these, and convert("RGB") would clip every
# value above 255 to white instead of scaling it.
_WIDE_INTEGER_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": None}


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: greyscale, palette, RGBA (alpha dropped), CMYK and 16/32-bit
    integer greyscale (scaled by its range, not clipped)."""
    if image.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        full_scale = _WIDE_INTEGER_MODES[image.mode] or (65535 if values.max() > 255 else 255)
        grey = np.clip(np.rint(values * 255.0 / full_scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
