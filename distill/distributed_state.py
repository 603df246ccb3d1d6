"""Whole state dicts of a student that may be sharded (FSDP2), gathered and restored collectively.

Under DDP (or one process) every process holds the whole model, and the state dicts are the
modules' own. Under FSDP2 each process holds a shard: parameters, their optimizer moments and
the EMA's shadow copies are DTensors. Then:

- gathering is a collective: every process calls it (tensors in the same order), and each gets
  the whole tensors (`DTensor.full_tensor()`); a rank-0-only gather would hang;
- restoring cuts the whole tensors back into each process's shard (`distribute_tensor` with the
  parameter's own mesh and placements).

Checkpoints therefore hold the same whole tensors however the run was sharded, and the optimizer
state keeps its usual layout (by parameter index). torch 2.14's `get_model_state_dict(...,
full_state_dict=True)` handed back DTensors for accelerate-prepared FSDP2 modules on CPU, hence
the gather here is explicit.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(value: Any) -> Any:
    """`value` with every DTensor gathered into an owned whole tensor (dicts and lists too)."""
    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, dict):
        return {key: whole(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(whole(inner) for inner in value)
    return value


def student_state(accelerator: Accelerator, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of the (prepared) student; collective when it is sharded."""
    return whole(accelerator.unwrap_model(student).state_dict())


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with whole moments; collective when they are sharded."""
    return whole(optimizer.state_dict())


def full_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [whole(tensor) for tensor in tensors]


def like(template: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The whole tensor `full` placed as `template` is: this process's shard of it when
    `template` is a DTensor, else on its device and in its dtype."""
    if isinstance(template, DTensor):
        full = full.to(template.device_mesh.device_type, template.dtype)
        return distribute_tensor(full, template.device_mesh, template.placements)
    return full.to(template.device, template.dtype)


@torch.no_grad()
def load_student_state(
    accelerator: Accelerator, student: torch.nn.Module, state: dict[str, torch.Tensor]
) -> None:
    """Load a whole state dict into the prepared student (every process, the same `state`)."""
    module = accelerator.unwrap_model(student)
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    named = dict(tensors)
    missing = sorted(set(named) - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks student tensors: {', '.join(missing[:5])}")
    for name, tensor in named.items():
        if isinstance(tensor, DTensor):
            tensor.to_local().copy_(like(tensor, state[name]).to_local())
        else:
            tensor.copy_(state[name])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state dict of whole moments, cut like each parameter (by parameter index)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    placed = {
        index: {
            key: like(parameters[index], value)
            if isinstance(value, torch.Tensor) and value.shape == parameters[index].shape
            else value
            for key, value in moments.items()
        }
        for index, moments in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": placed})
