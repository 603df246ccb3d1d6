"""Fashion-MNIST as a text-to-image dataset: the offline stand-in for LAION captions.

Source: Debian's `dataset-fashion-mnist` (Xiao et al. 2017, MIT), the original IDX files under
/usr/share/datasets/fashion-mnist/. When they are missing we try the hub copy
`zalando-datasets/fashion_mnist`, then give up with a clear error.

Images are 28×28 **RGB** PIL images (the grey level copied into three channels): Stable Diffusion
VAEs and every SD preprocessing path expect 3-channel images, so consumers need no special case;
resizing to the model resolution (32 px for the tiny teachers) is the preprocessing's job, as in
SD training scripts.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserInputError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_SIZE = 28  # Fashion-MNIST's images
IMAGE_SIZE = 32  # the offline world's resolution: a multiple of the tiny VAE's factor 4
HUB_DATASET = "zalando-datasets/fashion_mnist"

# Label order of the original dataset (index = label id).
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# "{}" is the class as a noun phrase with its article: "a dress", "an ankle boot".
CAPTION_TEMPLATES = (
    "a photo of {}",
    "{}",
    "a picture of {}, product photo",
)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def class_phrase(label: int) -> str:
    """Class `label` as a noun phrase: "a t-shirt/top", "an ankle boot"."""
    name = FASHION_CLASSES[label].lower()
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption_for(label: int, template_index: int = 0) -> str:
    """The caption of class `label` in template `template_index`, e.g. "a photo of a dress"."""
    return CAPTION_TEMPLATES[template_index].format(class_phrase(label))


def _check_split(split: str) -> None:
    if split not in _IDX_FILES:
        raise UserInputError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (LeCun's MNIST format) into a uint8 array.

    Header: 2 zero bytes, a type code (0x08 = unsigned byte), the number of dimensions d, then d
    big-endian uint32 sizes; the data follow in C order.
    """
    raw = gzip.open(path).read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserInputError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).tolist())
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images (N, 28, 28) uint8, labels (N,) int64) for `split` ("train" or "test")."""
    _check_split(split)
    image_file, label_file = (FASHION_MNIST_DIR / name for name in _IDX_FILES[split])
    if image_file.is_file() and label_file.is_file():
        return read_idx(image_file), read_idx(label_file).astype(np.int64)
    return _arrays_from_hub(split)


def _arrays_from_hub(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        import datasets

        hub = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as error:  # offline, hub down, no such dataset: all mean the same to a user
        raise UserInputError(
            "Fashion-MNIST not found: install the Debian package `dataset-fashion-mnist` "
            f"(hub fallback {HUB_DATASET} failed: {type(error).__name__})"
        ) from error
    images = np.stack([np.asarray(image.convert("L")) for image in hub["image"]])
    return images, np.asarray(hub["label"], dtype=np.int64)


def fashion_pixels(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (B, 28, 28) grey images → float (B, 3, size, size) in [-1, 1], bilinear.

    What the in-domain judge (`offline.fashion_classifier`) is trained on; the teachers and students
    see the same images through the engine's preprocessing (`distill.data.preprocess`: bicubic).
    """
    pixels = torch.tensor(images, dtype=torch.float32).div(127.5).sub(1.0)  # copies
    pixels = F.interpolate(pixels[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return pixels.expand(-1, 3, -1, -1).contiguous()


def caption_template_indices(n: int, seed: int) -> np.ndarray:
    """Which template each of `n` samples uses: (n,) ints, a pure function of `seed`."""
    return np.random.default_rng(seed).integers(len(CAPTION_TEMPLATES), size=n)


def load_fashion_mnist(split: str = "train", max_samples: int | None = None, seed: int = 0):
    """Fashion-MNIST as a `datasets.Dataset` with columns `image`, `text`, `label`.

    `image` is a 28×28 RGB PIL image, `text` a caption of the label in one of CAPTION_TEMPLATES
    (chosen per sample from `seed`), `label` the class id. `max_samples` keeps the first samples
    (the IDX files are already shuffled).
    """
    import datasets  # heavy import, only when a Dataset is actually built

    images, labels = load_fashion_mnist_arrays(split)
    if max_samples is not None:
        if max_samples < 1:
            raise UserInputError(f"max_samples must be positive, got {max_samples}")
        images, labels = images[:max_samples], labels[:max_samples]
    templates = caption_template_indices(len(labels), seed)
    rgb = np.repeat(images[..., None], 3, axis=-1)  # (N, 28, 28, 3)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(FASHION_CLASSES)),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": list(rgb),
            "text": [caption_for(int(y), int(t)) for y, t in zip(labels, templates, strict=True)],
            "label": labels.tolist(),
        },
        features=features,
    )


def fashion_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` evaluation prompts, class-balanced (class i at positions i, i+10, ...), templates drawn
    from `seed`: the same (n, seed) always gives the same list."""
    if n < 1:
        raise UserInputError(f"number of prompts must be positive, got {n}")
    templates = caption_template_indices(n, seed)
    return [caption_for(i % len(FASHION_CLASSES), int(templates[i])) for i in range(n)]
