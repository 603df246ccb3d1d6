"""A Fashion-MNIST classifier trained by the toolkit: the judge behind the in-domain metrics.

No CLIP or Inception classifier weights ship offline, so the offline world's text-alignment and IS
numbers come from a classifier of its own domain: a 2-conv CNN (the one `benchmarks/
teacher_trials.py` used to tune the teachers, at half its width) trained on the 60,000 training
images, its accuracy on the 10,000 test images recorded with it.

Training (measured on this 2-core machine with another process on the second core): one epoch,
batch 128, Adam under a one-cycle schedule peaking at 4e-3: 27 s, 88.0% test accuracy; a second
epoch buys 0.9 points for twice the time. It runs on one intra-op thread: two threads took 44 s
per epoch under the same load (OpenMP spin-waiting, see docs/design.md), and 16-channel convolutions
gain little from a second core anyway.

Cached like the FID reference statistics: `$SD_DISTILL_CACHE/fashion-classifier/KEY.safetensors`
with `KEY.json` (settings, test accuracy), KEY a hash of the training settings, CLASSIFIER_VERSION
and the data. Both files are written under temporary names and renamed, the json last: a reader
sees either nothing or a complete classifier.

Input: what the training images go through, `classifier_input` on uint8 (B, C, H, W): the channel
mean as grey (the offline world's RGB images are grey copied into three channels, so this is the
exact grey level; for generated images, their luminance as the classifier was taught it), scaled to
[-1, 1], then bilinearly resized to 32×32. For the 28 px training images this is exactly
`offline.fashion_mnist.fashion_pixels` (tested; the teachers see the same images through the
engine's bicubic resize); the tiny pipelines' 32 px images pass through without a resize.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from core.atomic import atomic_path, write_text_atomic
from core.errors import UserInputError
from core.paths import default_cache_root

# Part of the cache key: bump it when the network, `classifier_input` or the training loop change.
CLASSIFIER_VERSION = "fashion-cnn-16-32/grey-mean-bilinear-32/onecycle-adam/v1"
INPUT_SIZE = 32  # the offline world's resolution (Fashion-MNIST's 28 px resized, as for the VAE)
NUM_CLASSES = 10
CACHE_FOLDER = "fashion-classifier"


@dataclass(frozen=True)
class ClassifierSettings:
    """How the classifier is trained; every field is part of its cache key."""

    epochs: int = 1
    batch_size: int = 128
    max_lr: float = 4e-3
    seed: int = 0
    max_train_samples: int | None = None  # None: all 60,000 training images

    def key(self, data_digest: str) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + f"|{CLASSIFIER_VERSION}|{data_digest}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def classifier_net() -> nn.Sequential:
    """(B, 1, 32, 32) in [-1, 1] -> (B, 10) logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, 16, 16)
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 8, 8)
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(32 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, NUM_CLASSES),
    )


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W), C = 1 or 3 -> float (B, 1, 32, 32) in [-1, 1] (module docstring)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (B, 1|3, H, W) images, got {images.dtype} {images.shape}")
    grey = images.float().mean(dim=1, keepdim=True).div(127.5).sub(1.0)  # (B, 1, H, W)
    if grey.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return grey
    shrinking = grey.shape[-1] > INPUT_SIZE or grey.shape[-2] > INPUT_SIZE
    return F.interpolate(
        grey,
        size=(INPUT_SIZE, INPUT_SIZE),
        mode="bilinear",
        align_corners=False,
        antialias=shrinking,
    )


class ImageLogits(nn.Module):
    """uint8 images (B, C, H, W) -> (B, 10) logits: the classifier behind the input conversion,
    in the form torchmetrics' `InceptionScore(feature=...)` calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net(classifier_input(images).to(device))


@dataclass
class FashionClassifier:
    """The trained network, how it was trained, and its accuracy on the real test set."""

    net: nn.Module
    settings: ClassifierSettings
    test_accuracy: float
    test_images: int
    key: str

    @property
    def logits_module(self) -> ImageLogits:
        return ImageLogits(self.net)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """uint8 (N, C, H, W) -> predicted classes (N,)."""
        module = self.logits_module
        return torch.cat([module(chunk).argmax(dim=1).cpu() for chunk in images.split(batch_size)])

    def describe(self) -> str:
        train = self.settings.max_train_samples or 60_000
        return (
            f"2-conv CNN trained by the toolkit on {train:,} Fashion-MNIST training images "
            f"({self.settings.epochs} epoch{'s' if self.settings.epochs > 1 else ''}, seed "
            f"{self.settings.seed}); test accuracy "
            f"{100 * self.test_accuracy:.2f}% on the {self.test_images:,} real test images"
        )


def load_fashion_classifier(
    settings: ClassifierSettings | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FashionClassifier:
    """The cached classifier for `settings`, trained (and cached) first if there is none."""
    from offline.fashion_mnist import load_fashion_mnist_arrays

    settings = settings or ClassifierSettings()
    train_images, train_labels = load_fashion_mnist_arrays("train")  # (60000, 28, 28), (60000,)
    test_images, test_labels = load_fashion_mnist_arrays("test")  # (10000, 28, 28), (10000,)
    digest = _data_digest(train_images, train_labels, test_images, test_labels)
    key = settings.key(digest)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_root()
    weights_file = folder / CACHE_FOLDER / f"{key}.safetensors"
    info_file = weights_file.with_suffix(".json")
    if weights_file.is_file() and info_file.is_file():
        info = json.loads(info_file.read_text())
        net = classifier_net()
        net.load_state_dict(load_file(weights_file))
        return FashionClassifier(
            net.to(device).eval(), settings, info["test_accuracy"], info["test_images"], key
        )

    start = time.perf_counter()
    net = train_classifier(train_images, train_labels, settings, device=device, progress=progress)
    seconds = time.perf_counter() - start
    accuracy = test_accuracy(net, test_images, test_labels)
    if progress:
        print(
            f"fashion classifier: trained in {seconds:.0f} s, test accuracy {100 * accuracy:.2f}%",
            flush=True,
        )
    with atomic_path(weights_file) as partial:  # the pid in its name: concurrent runs never collide
        save_file({k: v.contiguous().cpu() for k, v in net.state_dict().items()}, str(partial))
    info = {
        "settings": asdict(settings),
        "version": CLASSIFIER_VERSION,
        "data_digest": digest,
        "test_accuracy": accuracy,
        "test_images": len(test_labels),
        "train_seconds": round(seconds, 1),
    }
    # Written last: its presence means the weights are complete.
    write_text_atomic(info_file, json.dumps(info, indent=1) + "\n")
    return FashionClassifier(net.eval(), settings, accuracy, len(test_labels), key)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    settings: ClassifierSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train `classifier_net` on uint8 (N, 28, 28) images and (N,) labels; the caller's RNG state
    is left as it was."""
    if settings.max_train_samples is not None:
        if settings.max_train_samples < 1:
            raise UserInputError(
                f"max_train_samples must be positive, got {settings.max_train_samples}"
            )
        images, labels = images[: settings.max_train_samples], labels[: settings.max_train_samples]
    device = torch.device(device)
    pixels = _inputs(images).to(device)  # (N, 1, 32, 32)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)  # (N,)
    steps_per_epoch = -(-len(targets) // settings.batch_size)
    with torch.random.fork_rng(devices=[]), _one_thread(device):
        torch.manual_seed(settings.seed)  # initial weights and dropout
        net = classifier_net().to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=settings.max_lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=settings.max_lr, total_steps=settings.epochs * steps_per_epoch
        )
        order_generator = torch.Generator().manual_seed(settings.seed)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=settings.epochs * steps_per_epoch,
            desc="fashion classifier",
            unit="step",
            disable=not progress,
        )
        for _ in range(settings.epochs):
            order = torch.randperm(len(targets), generator=order_generator).to(device)
            for start in range(0, len(targets), settings.batch_size):
                index = order[start : start + settings.batch_size]
                loss = F.cross_entropy(net(pixels[index]), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
        bar.close()
    return net.eval()


@torch.no_grad()
def test_accuracy(net: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of uint8 (N, 28, 28) `images` classified as their `labels`."""
    device = next(net.parameters()).device
    net = net.eval()
    pixels = _inputs(images)
    predicted = torch.cat(
        [net(chunk.to(device)).argmax(dim=1).cpu() for chunk in pixels.split(1000)]
    )
    return float((predicted == torch.from_numpy(np.asarray(labels))).float().mean())


def _inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) Fashion-MNIST arrays -> classifier inputs (N, 1, 32, 32)."""
    return classifier_input(torch.tensor(images, dtype=torch.uint8)[:, None])  # a copy


def _data_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for CPU training (module docstring), restored afterwards."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
