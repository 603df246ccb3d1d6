"""`training.gradient_checkpointing`: each setting gives the same gradients; "selective" skips the
costly recompute that `true` pays for.

On a toy-width SD v1.4 UNet in fp32 (seeded): the gradients of every setting equal those of no
checkpointing bitwise (a recompute of the same ops on the same inputs gives the same numbers),
and the backward's convolution/matmul/attention FLOPs (torch's FlopCounterMode) show what each
recomputes: `true` runs the blocks' forward again, "selective" does not.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from distill.activation_checkpointing import enable_checkpointing, resolve_checkpointing
from offline.tiny_models import sd_v1_4_toy_config


def backward_of(setting: bool | str) -> tuple[dict[str, torch.Tensor], int]:
    """(gradients, backward FLOPs) of one seeded loss on a toy UNet."""
    torch.manual_seed(0)
    config = sd_v1_4_toy_config()
    model = UNet2DConditionModel(**config).train()
    applied = enable_checkpointing(model, setting)
    assert applied == (setting is not False)
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, config["cross_attention_dim"], generator=generator)
    loss = model(noisy, torch.tensor([10, 700]), encoder_hidden_states=text).sample.square().mean()
    with FlopCounterMode(display=False) as flops:
        loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}, flops.get_total_flops()


@pytest.fixture(scope="module")
def runs() -> dict[object, tuple[dict[str, torch.Tensor], int]]:
    return {setting: backward_of(setting) for setting in (False, True, "selective")}


@pytest.mark.parametrize("setting", [True, "selective"])
def test_every_setting_gives_the_gradients_of_no_checkpointing(runs, setting) -> None:
    reference, _ = runs[False]
    grads, _ = runs[setting]
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name


def test_selective_recomputes_no_convolution_matmul_or_attention(runs) -> None:
    _, none = runs[False]
    _, full = runs[True]
    _, selective = runs["selective"]
    assert selective == none
    # `true` runs each block's forward again: about half the backward's 2× forward more.
    assert full > 1.3 * none


def test_auto_is_selective_on_a_cpu_and_full_on_a_gpu() -> None:
    assert resolve_checkpointing("auto", "cpu") == "selective"
    assert resolve_checkpointing("auto", "cuda") is True
    for setting in (False, True, "selective"):  # an explicit setting is kept on every device
        assert resolve_checkpointing(setting, "cpu") == setting
        assert resolve_checkpointing(setting, "cuda") == setting
