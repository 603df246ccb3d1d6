"""Shared fixtures; the models behind them live in `testkit`."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from testkit.unets import make_tiny_teacher

# The test models are tiny: a second intra-op thread buys nothing, and when another process holds
# the other core OpenMP's spin-waiting makes two-thread kernels ~100x slower (measured: 12 s vs
# 0.08 s for one tiny-UNet training step on this 2-core machine).
torch.set_num_threads(1)


@pytest.fixture
def tiny_teacher() -> UNet2DConditionModel:
    return make_tiny_teacher()
