"""Image preprocessing for SD training: PIL image → (3, R, R) tensor in [-1, 1].

The same steps as diffusers' `train_text_to_image.py` (resize the shorter side, crop to a square,
optional horizontal flip, scale to [-1, 1]), but bicubic with antialiasing and written as pure
functions so the latent cache can fingerprint exactly what produced its latents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

# Bump when the pixel pipeline below changes: every cache built by the old one becomes stale.
PIPELINE_VERSION = "resize-bicubic-antialias/crop/flip/to-[-1,1]@1"


@dataclass(frozen=True)
class PreprocessSpec:
    """What turns a source image into model input.

    resolution: side of the square output, in pixels.
    center_crop: crop the middle square; otherwise a random square (seeded, see `crop_box`).
    random_flip: train on horizontal flips too (the cache stores both variants).
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

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

    RGB conversion first (greyscale, palette and RGBA sources all become 3 channels; alpha is
    dropped), then the shorter side is resized to R (bicubic, antialiased), then a square crop, then
    the optional horizontal flip. `flip` is an argument, not a coin toss, because the cache encodes
    both variants of the same crop.
    """
    image = F.resize(
        image.convert("RGB"),
        [spec.resolution],  # one number = the shorter side, aspect ratio kept
        interpolation=InterpolationMode.BICUBIC,
        antialias=True,
    )
    width, height = image.size
    top, left = crop_box(
        height, width, spec.resolution, center=spec.center_crop, generator=generator
    )
    image = F.crop(image, top, left, spec.resolution, spec.resolution)
    if flip:
        image = F.horizontal_flip(image)
    pixels = F.to_dtype(F.to_image(image), torch.float32, scale=True)  # (3, R, R) in [0, 1]
    return pixels.as_subclass(torch.Tensor) * 2.0 - 1.0
