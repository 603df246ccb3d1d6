"""Shared fixtures; the models behind them live in `testkit`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from offline.fashion_classifier import (
    ClassifierSettings,
    FashionClassifier,
    load_fashion_classifier,
)
from testkit.unets import make_tiny_teacher

# The test models are tiny: a second intra-op thread buys nothing, and when another process holds
# the other core OpenMP's spin-waiting makes two-thread kernels ~100x slower (measured: 12 s vs
# 0.08 s for one tiny-UNet training step on this 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session cache, also exported as $SD_DISTILL_CACHE, so no test writes to ~/.cache
    (latent caches, fingerprint index, converted weights, reference statistics)."""
    folder = tmp_path_factory.mktemp("sd-distill-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SD_DISTILL_CACHE", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate's AcceleratorState is a process-wide singleton that refuses a second mixed
    precision (accelerate 1.15): a test that built a bf16 Accelerator (the SD-step benchmark,
    the compile tests) would fail the next fp32 run on the same worker. Each test starts clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def tiny_teacher() -> UNet2DConditionModel:
    return make_tiny_teacher()


JUDGE_SETTINGS = ClassifierSettings(max_train_samples=10_000)  # ~9 s instead of ~40 s


@pytest.fixture(scope="session")
def fashion_judge(cache_dir: Path) -> FashionClassifier:
    """The Fashion-MNIST classifier, trained once per session into the session cache."""
    return load_fashion_classifier(JUDGE_SETTINGS, cache_dir=cache_dir, progress=False)


@pytest.fixture
def random_images():
    """`random_images(count, size=48, seed=0)` -> seeded uniform-noise RGB PIL images."""

    def make(count: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
        rng = np.random.default_rng(seed)
        shape = (size, size, 3)
        return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]

    return make
