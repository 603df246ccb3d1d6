"""`saved_weight_casts`: a bf16 backward keeps the fp32 parameters, not their bf16 copies.

On real autograd graphs (CPU, seeded): a saved cast of a parameter is packed as the parameter and
every other saved tensor as itself; a linear layer's backward reads a fresh cast, not a kept copy,
and gets the same gradient; a toy-width SD v1.4 UNet under bf16 autocast gets bitwise the
gradients of the plain backward. A cast `.to(dtype)` cannot make again (another memory format) is
left as it is, and a parameter written in place before the backward is refused, as autograd
refuses any saved tensor written since. Packing every cast (an activation's too), ignoring views
(a linear layer saves its weight transposed), recasting without the view's geometry, ignoring the
layout or the version: each fails a test here.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from distill.recipe import TrainingSpec
from distill.saved_weight_casts import (
    _pack,
    _RecastOnUnpack,
    _unpack,
    saved_weight_casts,
    step_autocast_kwargs,
)
from distill.stage import training_accelerator
from offline.tiny_models import sd_v1_4_toy_config


def test_a_cast_of_a_parameter_is_packed_as_the_parameter() -> None:
    weight = nn.Parameter(torch.randn(8, 8))
    copy = weight.to(torch.bfloat16)
    packed = _pack(copy)
    assert isinstance(packed, _RecastOnUnpack)
    assert packed.parameter is weight
    assert torch.equal(_unpack(packed), copy)


def test_a_cast_that_also_changes_the_layout_is_kept_as_it_is() -> None:
    """`.to(dtype)` could not make it again (the recast would come back in the wrong layout)."""
    weight = nn.Parameter(torch.randn(4, 4, 3, 3))
    copy = weight.to(torch.bfloat16, memory_format=torch.channels_last)
    assert _pack(copy) is copy


def test_a_parameter_written_in_place_before_the_backward_is_refused() -> None:
    weight = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16, cache_enabled=False), saved_weight_casts():
        loss = nn.functional.linear(x, weight).float().sum()
    with torch.no_grad():
        weight.mul_(3)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_activations_and_their_casts_are_kept_as_they_are() -> None:
    weight = nn.Parameter(torch.randn(8, 8))
    activation = torch.randn(4, 8) @ weight  # not a leaf
    cast = activation.to(torch.bfloat16)
    assert _pack(activation) is activation
    assert _pack(cast) is cast
    frozen = torch.randn(8, 8).to(torch.bfloat16)  # a cast without a graph
    assert _pack(frozen) is frozen


def saved_by(loss: torch.Tensor, node_name: str, attribute: str) -> torch.Tensor:
    """What the first `node_name` node of `loss`'s graph saved as `attribute` (unpacked)."""
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == node_name:
            return getattr(node, attribute)
        pending.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError(f"no {node_name} in the graph")


def test_a_linear_layer_keeps_its_weight_not_the_copy_and_the_gradient_is_the_same() -> None:
    """A linear layer under autocast saves its cast weight transposed (a view of the copy)."""
    weight = nn.Parameter(torch.randn(64, 32))
    x = torch.randn(4, 32, requires_grad=True)  # an activation: its gradient reads the weight
    grads, reads = [], []
    for hooks in (nullcontext(), saved_weight_casts()):
        with torch.autocast("cpu", torch.bfloat16, cache_enabled=False), hooks:
            loss = nn.functional.linear(x, weight).float().square().sum()
        first, second = (saved_by(loss, "MmBackward0", "_saved_mat2") for _ in range(2))
        assert torch.equal(first, weight.to(torch.bfloat16).t())
        reads.append(first.data_ptr() == second.data_ptr())
        loss.backward()
        grads.append(weight.grad)
        weight.grad = None
    # Without the hooks both reads are the one kept copy; with them, each is cast afresh.
    assert reads == [True, False]
    assert torch.equal(grads[0], grads[1])


def unet_gradients(hooks: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = sd_v1_4_toy_config()
    model = UNet2DConditionModel(**config).train()
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, config["cross_attention_dim"], generator=generator)
    autocast = torch.autocast("cpu", torch.bfloat16, **step_autocast_kwargs().to_kwargs())
    with autocast, saved_weight_casts() if hooks else nullcontext():
        out = model(noisy, torch.tensor([10, 700]), encoder_hidden_states=text).sample
    out.float().square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_a_bf16_unet_backward_is_bitwise_the_same() -> None:
    reference, recast = unet_gradients(hooks=False), unet_gradients(hooks=True)
    assert recast.keys() == reference.keys()
    for name, grad in recast.items():
        assert torch.equal(grad, reference[name]), name


def test_the_trainers_accelerator_runs_without_autocasts_cast_cache(tmp_path) -> None:
    accelerator = training_accelerator(TrainingSpec(mixed_precision="bf16"), tmp_path)
    assert accelerator.autocast_handler.to_kwargs() == {"cache_enabled": False}
    assert step_autocast_kwargs().to_kwargs() == {"cache_enabled": False}
