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
        setting = resolve_mixed_precision(mixed_precision, weights_dtype)
        return cls(weights, MIXED_PRECISION_DTYPES.get(setting, weights))

    @property
    def is_reference(self) -> bool:
        """A float64 run: every model, frozen or trained, is cast to float64."""
        return self.weights == torch.float64


def native_bf16(device_type: str) -> bool:
    """Whether the device computes bf16 natively: a CUDA GPU that supports it (Ampere and
    later), or a CPU with AVX512-BF16 or AMX (oneDNN's bf16 kernels; elsewhere bf16 is emulated
    and slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_mixed_precision(setting: str, weights_dtype: str = "float32") -> str:
    """The recipe's `training.mixed_precision` as accelerate takes it: "auto" is "bf16" where the
    device this process trains on computes bf16 natively (`native_bf16`), else "no"; a float64
    reference run is never mixed."""
    if setting != "auto":
        return setting
    if weights_dtype == "float64":
        return "no"
    return "bf16" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "no"


def at_least_fp32(tensor: Tensor) -> Tensor:
    """`tensor` in fp32 when it is a 16-bit float (losses reduce in fp32: a bf16 mean of many
    small squared errors loses digits), else as it is (a float64 reference run stays float64)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
