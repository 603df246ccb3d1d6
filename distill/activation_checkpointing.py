"""`training.gradient_checkpointing`: what a trained network's backward computes again.

    false        every activation kept: the most memory, nothing recomputed
    true         diffusers' checkpointing: each ResNet and transformer block keeps only its
                 inputs and runs its whole forward again in the backward
    "selective"  the same blocks, but their recompute skips the costly ops: the outputs of
                 convolutions, matmuls and attention are kept, and only the cheap ops between
                 them run again (norms, activations, adds, autocast's casts)

"auto" is "selective" on a CPU and `true` on a GPU. A CPU trains at a small batch, where
activations are a small part of memory (BK-SDM's side by side at batch 1, 512 px: "selective"
costs 0.13 GB over `true` and takes 8.62 s a step against 9.59, README); a GPU trains at a batch
where they dominate memory.

"selective" is PyTorch's selective activation checkpointing (`torch.utils.checkpoint` with a
policy from `create_selective_checkpoint_contexts`) passed to diffusers as the checkpointing
function. The outputs it keeps are most of a block's FLOPs and a minority of its activation
memory: norms and activations are as large as a convolution's output and are recomputed. At SD
v1.4's shapes, 512 px, batch 1, bf16 (`benchmarks/sd_step.py --losses bk-sdm`, this project's
2-core CPU): activations and temporaries 0.85 GiB with `true`, 1.02 with "selective", 1.6 with
`false`; the step 12.5 s, 10.6 s and 10.1 s. At a GPU's batch 32 activations dominate memory
and `true` remains the setting that fits the most.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import core.cpu_attention  # noqa: F401 (registers sd_distill::cpu_attention)

CheckpointingSetting = Literal["selective"] | bool

aten = torch.ops.aten
# The ops whose outputs "selective" keeps: the matmul-bound work of a UNet block on any device
# (the attention kernels differ per backend; the ones this torch build lacks are skipped).
_KEPT_OP_NAMES = (
    "convolution",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
KEPT_OPS = frozenset(
    [getattr(aten, name).default for name in _KEPT_OP_NAMES if hasattr(aten, name)]
    + [torch.ops.sd_distill.cpu_attention.default]  # the project's CPU kernel (core.cpu_attention)
)


def _keep_costly_outputs(context: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(module: nn.Module, *args: Any) -> Any:
    """diffusers' `gradient_checkpointing_func` signature: run `module(*args)` under a
    non-reentrant checkpoint that keeps the costly ops' outputs (`KEPT_OPS`)."""
    return checkpoint(
        module.__call__,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_costly_outputs),
    )


def resolve_checkpointing(
    setting: CheckpointingSetting | Literal["auto"], device_type: str
) -> CheckpointingSetting:
    """`training.gradient_checkpointing` as applied on `device_type`: "auto" is "selective" on
    a CPU and true elsewhere."""
    if setting == "auto":
        return "selective" if device_type == "cpu" else True
    return setting


def enable_checkpointing(model: nn.Module, setting: CheckpointingSetting) -> bool:
    """Apply `training.gradient_checkpointing` to `model` (a diffusers model: its blocks carry
    the checkpoint calls); False where it does not support checkpointing or the setting is off."""
    if setting is False or not hasattr(model, "enable_gradient_checkpointing"):
        return False
    function: Callable[..., Any] | None = selective_checkpoint if setting == "selective" else None
    model.enable_gradient_checkpointing(function)
    return True
