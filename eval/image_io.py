"""Images on disk ↔ uint8 tensors, in the exact form the FID Inception and CLIP expect.

Decoding follows torch-fidelity (`ImagesPathDataset`: PIL `.convert("RGB")`, then uint8 CHW), so a
folder gives the same features here as through `torch_fidelity.calculate_metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (generated files are `000123.png`)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to `size`×`size`, aspect ratio not kept: BK-SDM's `img.resize((256, 256))`
    (Pillow's default filter for resize is bicubic), used for its generated images and for the
    COCO val2014 reference alike (`src/utils/misc.py: change_img_size`)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image → (3, H, W) uint8 RGB tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def open_rgb(item: str | Path | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as image:
        return image.convert("RGB")


def uint8_batches(
    images: Iterable[str | Path | Image.Image], batch_size: int, resize_to: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) uint8 batches. A batch holds images of one size only: when the size
    changes (mixed-size reference folders) the batch is cut early rather than resizing silently."""
    batch: list[torch.Tensor] = []
    for item in images:
        image = open_rgb(item)
        if resize_to is not None:
            image = resize_square(image, resize_to)
        tensor = to_uint8_tensor(image)
        if batch and (len(batch) == batch_size or batch[0].shape != tensor.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(tensor)
    if batch:
        yield torch.stack(batch)
