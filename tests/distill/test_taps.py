"""Feature taps: hooks by module path, always removed, resolved through training wrappers."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from core.errors import UserInputError
from distill.losses import SimilarityMatchingLoss
from distill.taps import FeatureTaps, resolve_module, unwrap_model
from testkit.records import features


class ResidualBlock(nn.Module):
    """Returns (hidden, residuals) like a diffusers down block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        hidden = self.proj(x).relu()
        return hidden, (x, hidden)


class TinyNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([ResidualBlock(width), ResidualBlock(width)])
        self.mid_block = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.down_blocks:
            x, _ = block(x)
        return self.mid_block(x)


def all_forward_hooks(model: nn.Module) -> list:
    return [hook for module in model.modules() for hook in module._forward_hooks.values()]


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def single_process_group():
    """A real one-process gloo group on a free local port, destroyed afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_hooks_are_removed_on_exit(net):
    with FeatureTaps(net, ["down_blocks.0", "mid_block"]):
        assert len(all_forward_hooks(net)) == 2
    assert all_forward_hooks(net) == []


def test_hooks_are_removed_when_the_forward_raises(net):
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        with FeatureTaps(net, ["down_blocks.1", "mid_block"]):
            net(torch.randn(2, 3))  # wrong width
    assert all_forward_hooks(net) == []


def test_tuple_output_is_tapped_as_its_first_element(net):
    x = torch.randn(2, 4)
    with FeatureTaps(net, ["down_blocks.0", "mid_block"]) as taps:
        output = net(x)
    expected_hidden, _ = net.down_blocks[0](x)
    torch.testing.assert_close(taps.features["down_blocks.0"], expected_hidden)
    torch.testing.assert_close(taps.features["mid_block"], output)


def test_student_features_keep_their_graph_and_teacher_features_are_detached(net):
    x = torch.randn(2, 4)
    with FeatureTaps(net, ["mid_block"]) as student_taps:
        net(x)
    with FeatureTaps(net, ["mid_block"], detach=True) as teacher_taps:
        net(x)
    assert student_taps.features["mid_block"].requires_grad
    assert not teacher_taps.features["mid_block"].requires_grad


def test_clear_drops_features_and_each_forward_refills_them(net):
    with FeatureTaps(net, ["mid_block"]) as taps:
        net(torch.randn(2, 4))
        taps.clear()
        assert taps.features == {}
        second = net(torch.randn(2, 4))
    torch.testing.assert_close(taps.features["mid_block"], second)


def test_unknown_path_is_a_user_error_naming_it(net):
    with pytest.raises(UserInputError, match=r"'down_blocks\.7'.*has: 0, 1"):
        FeatureTaps(net, ["down_blocks.7"])
    with pytest.raises(UserInputError, match="'up_blocks'"):
        FeatureTaps(net, ["up_blocks.0"])
    assert all_forward_hooks(net) == []


def test_duplicate_paths_share_one_hook(net):
    with FeatureTaps(net, ["mid_block", "mid_block"]) as taps:
        assert len(all_forward_hooks(net)) == 1
        assert taps.paths == ["mid_block"]


def test_taps_through_ddp_match_the_unwrapped_model(net, single_process_group):
    ddp = nn.parallel.DistributedDataParallel(net)
    assert unwrap_model(ddp) is net
    x = torch.randn(2, 4)
    paths = ["down_blocks.0", "down_blocks.1", "mid_block"]
    with FeatureTaps(net, paths) as plain:
        net(x)
    with FeatureTaps(ddp, paths) as wrapped:  # paths without the `module.` prefix
        ddp(x)
    assert wrapped.features.keys() == plain.features.keys()
    for path in paths:
        torch.testing.assert_close(wrapped.features[path], plain.features[path])
    assert all_forward_hooks(net) == []


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_taps_through_nested_fsdp_wrappers(net, single_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    x = torch.randn(2, 4)
    with FeatureTaps(net, ["down_blocks.1.proj", "mid_block"]) as plain:
        net(x)
    # Auto-wrapping puts an FSDP wrapper (and a `_fsdp_wrapped_module.` segment) around each block.
    fsdp = FullyShardedDataParallel(
        net, auto_wrap_policy=ModuleWrapPolicy({ResidualBlock}), device_id=torch.device("cpu")
    )
    assert isinstance(fsdp.down_blocks[1], FullyShardedDataParallel)
    with FeatureTaps(fsdp, ["down_blocks.1.proj", "mid_block"]) as wrapped:
        fsdp(x)
    for path in ("down_blocks.1.proj", "mid_block"):
        torch.testing.assert_close(wrapped.features[path], plain.features[path])


def test_paths_resolve_through_compile_and_stacked_wrappers(net):
    compiled = torch.compile(net)  # wraps only; nothing is compiled until it is called
    assert unwrap_model(compiled) is net
    stacked = nn.DataParallel(compiled)  # a wrapper around a wrapper, peeled repeatedly
    assert unwrap_model(stacked) is net
    assert resolve_module(stacked, "down_blocks.1") is net.down_blocks[1]
    FeatureTaps(compiled, ["down_blocks.1", "mid_block"])  # resolves without `_orig_mod.`


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 5, 32, generator=generator)
    return latents, torch.tensor([10, 500]), text


def test_unet_stage_outputs_have_the_expected_shapes(tiny_unet):
    latents, timesteps, text = unet_inputs()
    paths = [
        "down_blocks.0",  # (hidden, residuals) -> hidden after the downsampler
        "mid_block",
        "up_blocks.1",  # last stage: no upsampler
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # tokens (B, H·W, C)
    ]
    with torch.no_grad(), FeatureTaps(tiny_unet, paths) as taps:
        tiny_unet(latents, timesteps, text)
    shapes = {path: tuple(feature.shape) for path, feature in taps.features.items()}
    assert shapes == {
        "down_blocks.0": (2, 32, 4, 4),
        "mid_block": (2, 64, 4, 4),
        "up_blocks.1": (2, 32, 8, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (2, 64, 32),
    }
    assert all_forward_hooks(tiny_unet) == []


def test_similarity_through_taps_trains_the_student_only(tiny_unet):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    # A narrower student: similarity matching does not need equal widths.
    student = UNet2DConditionModel(**{**tiny_unet.config, "block_out_channels": (16, 32)})
    latents, timesteps, text = unet_inputs()
    pairs = [("down_blocks.0", "down_blocks.0"), ("up_blocks.1", "up_blocks.1")]
    with torch.no_grad(), FeatureTaps(tiny_unet, ["down_blocks.0", "up_blocks.1"], True) as teacher:
        tiny_unet(latents, timesteps, text)
    with FeatureTaps(student, ["down_blocks.0", "up_blocks.1"]) as taps:
        student(latents, timesteps, text)
    similarity = SimilarityMatchingLoss(layer_pairs=pairs, max_positions=16)
    loss = similarity(features(taps.features, teacher.features))
    loss["similarity"].backward()
    assert student.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_unet.parameters())
