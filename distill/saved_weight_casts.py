"""Autograd keeps a parameter, not its low-precision copy, for the backward of mixed precision.

Under bf16/fp16 autocast every fp32 weight a convolution or a linear layer uses is cast first
(`aten::_to_copy`), and the layer saves that copy (a linear layer: its transpose) for its
backward, grad_input = grad_output · W. Without gradient checkpointing all of them stay alive
from the forward to the backward: the student's whole weight set again at half size (SD v1.4's
`base` student: 1.08 GiB in bf16). `saved_weight_casts()` packs each such copy as its fp32
parameter and casts it again when the backward reads it. The cast is exact and deterministic,
so the gradients are bitwise those of the plain backward; the price is one more cast of each
weight per step.

Autocast's own cast cache would still hold every copy until the outermost autocast exits (the
end of the loss step's forward, where the teacher runs after the student), so a training step
also runs with that cache off (`step_autocast_kwargs`, given to the Accelerator,
whose prepared model wraps its forward in an autocast of its own): a UNet uses each weight once
per forward, and the cache saves nothing then. Sampling is another matter (the same weights at
every denoising step): the trainer's grids run under an autocast with the cache on. Inside a
checkpointed block `torch.utils.checkpoint`'s own hooks take precedence, and nothing changes there.

Both together, at SD v1.4's shapes, 512 px, batch 1, BK-SDM's losses, on a 2-core CPU
(`benchmarks/sd_step.py --losses bk-sdm`): peak RSS without checkpointing 12.61 -> 11.86 GiB,
with full checkpointing 11.84 -> 11.70, with selective 11.97 -> 11.85; the step times the same
within 1%. Without checkpointing the step is then 13% faster than with full checkpointing in
0.16 GiB more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs

_CAST_NODE = "ToCopyBackward0"


@dataclass(frozen=True, eq=False)
class _RecastOnUnpack:
    parameter: torch.Tensor  # the fp32 leaf the saved copy was cast from
    dtype: torch.dtype  # the copy's dtype
    version: int  # the parameter's `_version` at the forward: an in-place write since is refused
    # (size, stride, storage offset) when what was saved is a view of the copy: a linear layer
    # saves its cast weight transposed (`weight.t()`, a TBackward0 view of the ToCopyBackward0)
    view: tuple[torch.Size, tuple[int, ...], int] | None = None


def _pack(tensor: torch.Tensor) -> torch.Tensor | _RecastOnUnpack:
    copy = tensor._base if tensor._is_view() else tensor
    node = copy.grad_fn
    # A cast of a leaf that requires grad: ToCopyBackward0 -> AccumulateGrad(leaf).
    if node is None or type(node).__name__ != _CAST_NODE:
        return tensor
    leaf = getattr(node.next_functions[0][0], "variable", None)
    # Only a cast that `leaf.to(dtype)` makes again exactly: same device, shape and strides
    # (not one that also moved the tensor or changed its memory format).
    if (
        leaf is None
        or leaf.dtype == copy.dtype
        or leaf.device != copy.device
        or leaf.shape != copy.shape
        or leaf.stride() != copy.stride()
    ):
        return tensor
    view = None
    if copy is not tensor:
        view = (tensor.size(), tensor.stride(), tensor.storage_offset())
    return _RecastOnUnpack(leaf, copy.dtype, leaf._version, view)


def _unpack(saved: torch.Tensor | _RecastOnUnpack) -> torch.Tensor:
    if not isinstance(saved, _RecastOnUnpack):
        return saved
    if saved.parameter._version != saved.version:
        # What autograd says of a saved tensor written in place: the copy would have kept the
        # forward's values, the parameter no longer has them.
        raise RuntimeError(
            "a parameter saved for the backward (as its low-precision cast) was modified by an "
            "inplace operation between the forward and the backward"
        )
    # `.to` keeps the parameter's strides, as autocast's cast did: the view's geometry holds.
    copy = saved.parameter.detach().to(saved.dtype)
    return copy if saved.view is None else copy.as_strided(*saved.view)


@contextmanager
def saved_weight_casts() -> Iterator[None]:
    """Within: the low-precision casts of parameters that autograd saves are kept as the
    parameters themselves (see the module docstring). Wrap the forward; the backward needs
    nothing."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


@contextmanager
def step_forward(accelerator: Accelerator) -> Iterator[None]:
    """A training step's forward: the run's autocast (its Accelerator built with
    `step_autocast_kwargs`) with the saved casts kept as parameters. The trainer's loss step and
    `benchmarks/sd_step.py` both run under it."""
    with accelerator.autocast(), saved_weight_casts():
        yield


def step_autocast_kwargs() -> AutocastKwargs:
    """The Accelerator's autocast settings for training steps: no cast cache (module docstring)."""
    return AutocastKwargs(cache_enabled=False)
