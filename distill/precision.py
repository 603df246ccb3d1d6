"""The dtypes of a run, decided once from the recipe's `training` block.

    weights   the trained network, its EMA and optimizer state, and the step's own tensors
              (noise, latents, targets): float32, or float64 for a reference run
    compute   what the frozen models (teachers) run in: the autocast dtype under mixed
              precision, else the weights' dtype

A float64 run is for numbers that must agree across CPUs: kernel rounding differs between CPU
models (vector width, GEMM blocking, MKL's code path on AMD), and in fp32 a short seeded run
drifts by up to 0.3% between two machines of one kind; in float64 the same rounding sits near
1e-15 and stays far below any real change (`tests/distill/test_recorded_run.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype
    compute: torch.dtype

    @classmethod
    def of(cls, mixed_precision: str, weights_dtype: str = "float32") -> Precision:
        weights = WEIGHTS_DTYPES[weights_dtype]
        return cls(weights, MIXED_PRECISION_DTYPES.get(mixed_precision, weights))

    @property
    def is_reference(self) -> bool:
        """A float64 run: every model, frozen or trained, is cast to float64."""
        return self.weights == torch.float64


def at_least_fp32(tensor: Tensor) -> Tensor:
    """`tensor` in fp32 when it is a 16-bit float (losses reduce in fp32: a bf16 mean of many
    small squared errors loses digits), else as it is (a float64 reference run stays float64)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
