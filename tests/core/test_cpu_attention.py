"""The CPU attention kernel (`core.cpu_attention`): as exact as torch's, wherever it is used.

The reference is float64 attention of the same bf16 inputs. The kernel's outputs and gradients
must be as close to it as torch's own bf16 kernel is (its relative error, with 10% slack), at
SD's shapes and at shapes that leave every tile partial. A kernel that drops a key, a padding
row or the softmax's Jacobian term is off by far more than bf16's rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from core import cpu_attention as cpu_attention_module
from core import kernels
from core.cpu_attention import (
    KERNEL_FORWARD_MIN_SCORES,
    KernelAttentionMode,
    available,
    cpu_attention,
    cpu_attention_backward,
    kernel_takes,
    use_kernel_attention,
)
from distill.activation_checkpointing import enable_checkpointing
from offline.tiny_models import sd_v1_4_toy_config

pytestmark = pytest.mark.skipif(not available(), reason="needs x86 with AVX512-BF16 and g++")

CPU = torch.device("cpu")

# (query shape, key/value shape): SD's cross-attention (77 text tokens), tails of every tile
# (query tiles of 32 and 64 rows, key blocks of 16, 64 and 256), head dims 2 to 256.
SHAPES = [
    ((1, 8, 1024, 40), (1, 8, 1024, 40)),
    ((1, 8, 300, 40), (1, 8, 77, 40)),
    ((2, 3, 100, 64), (2, 3, 290, 64)),
    ((1, 2, 33, 80), (1, 2, 17, 80)),
    ((1, 2, 65, 160), (1, 2, 257, 160)),
    ((2, 4, 129, 2), (2, 4, 65, 2)),
    ((1, 1, 5, 256), (1, 1, 3, 256)),
]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def bf16_inputs(query_shape, kv_shape, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = (query_shape, kv_shape, kv_shape, query_shape)  # q, k, v, dO
    # Scores of spread ~2.5: peaked enough that a wrong max or lse shows.
    return [torch.randn(s, generator=generator).mul(1.6).bfloat16() for s in shapes]


def reference(query, key, value, grad_out) -> tuple[torch.Tensor, ...]:
    """float64 output, log-sum-exp and (dq, dk, dv) of the same bf16 inputs."""
    q, k, v = (t.double().requires_grad_() for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    out = scores.softmax(-1) @ v
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double())
    return out.detach(), scores.logsumexp(-1).detach(), *grads


def torch_kernel(query, key, value, grad_out) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)


@pytest.mark.parametrize(("query_shape", "kv_shape"), SHAPES)
def test_forward_and_backward_are_as_exact_as_torch(query_shape, kv_shape) -> None:
    query, key, value, grad_out = bf16_inputs(query_shape, kv_shape)
    scale = query_shape[-1] ** -0.5
    out, lse = cpu_attention(query, key, value, scale)
    grads = cpu_attention_backward(grad_out, query, key, value, out, lse, scale)
    exact_out, exact_lse, *exact_grads = reference(query, key, value, grad_out)
    torch_out, *torch_grads = torch_kernel(query, key, value, grad_out)

    assert out.shape == query.shape and lse.shape == query.shape[:3]
    assert (lse.double() - exact_lse).abs().max() < 1e-4  # fp32 sums of fp32 probabilities
    for name, ours, theirs, exact in zip(
        ("out", "dq", "dk", "dv"),
        (out, *grads),
        (torch_out, *torch_grads),
        (exact_out, *exact_grads),
        strict=True,
    ):
        assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape, name
        bound = max(1.1 * relative_error(theirs, exact), 3e-3)
        assert relative_error(ours, exact) < bound, name


def diffusers_layout(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as diffusers' processor hands them over: (B, L, H·D) projections viewed
    as (B, H, L, D), a transposed, non-contiguous view."""
    batch, heads, length, dim = tensor.shape
    return (
        tensor.transpose(1, 2)
        .contiguous()
        .view(batch, length, heads * dim)
        .view(batch, length, heads, dim)
        .transpose(1, 2)
    )


def test_autograd_runs_the_kernels_backward_on_diffusers_layout() -> None:
    """From 1,024 keys the op's backward is the kernel's: through autograd, on the transposed
    views diffusers passes, as exact as torch's kernel."""
    query, key, value, grad_out = (
        diffusers_layout(t) for t in bf16_inputs((1, 2, 1024, 40), (1, 2, 1024, 40), seed=2)
    )
    assert not query.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    with torch.profiler.profile() as profile:
        out, _ = cpu_attention(*leaves, 40**-0.5)
        out.backward(grad_out)
    calls = {event.key for event in profile.key_averages()}
    assert "sd_distill::cpu_attention_backward" in calls
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" not in calls
    _, _, *exact = reference(query, key, value, grad_out)
    _, *on_torch = torch_kernel(query, key, value, grad_out)
    for name, leaf, theirs, expected in zip(
        ("dq", "dk", "dv"), leaves, on_torch, exact, strict=True
    ):
        assert relative_error(leaf.grad, expected) < 1.1 * relative_error(theirs, expected), name


def test_a_compiled_step_traces_both_passes() -> None:
    """torch.compile (AOTAutograd traces the backward with fake tensors) gives the eager
    gradients: both passes are ops with fake implementations."""
    inputs = bf16_inputs((1, 2, 1024, 40), (1, 2, 1024, 40), seed=3)

    def loss(query, key, value, grad_out):  # noqa: ANN001, ANN202
        return (cpu_attention(query, key, value, 40**-0.5)[0].float() * grad_out).sum()

    results = []
    for function in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs[:3]]
        function(*leaves, inputs[3]).backward()
        results.append([leaf.grad for leaf in leaves])
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(eager, compiled)


def test_two_threads_split_the_work_to_the_same_result() -> None:
    query, key, value, grad_out = bf16_inputs((1, 3, 200, 40), (1, 3, 150, 40), seed=1)
    scale = 40**-0.5
    threads = torch.get_num_threads()
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            out, lse = cpu_attention(query, key, value, scale)
            results.append(
                (out, lse, *cpu_attention_backward(grad_out, query, key, value, out, lse, scale))
            )
        finally:
            torch.set_num_threads(threads)
    one, two = results
    for name, a, b in zip(
        ("out", "lse", "dk", "dv"), one[:2] + one[3:], two[:2] + two[3:], strict=True
    ):
        assert torch.equal(a, b), name  # each item is computed whole by one thread
    # dq: two threads' partial fp32 sums added, so equal to fp32 rounding, then bf16's
    assert (one[2].float() - two[2].float()).abs().max() <= 2e-2 * one[2].float().abs().max()


def test_the_mode_routes_only_what_the_kernel_takes() -> None:
    query, key, value, _ = bf16_inputs((1, 2, 128, 40), (1, 2, 128, 40))
    mask = torch.ones(128, 128, dtype=torch.bool).tril()
    assert kernel_takes(query, key, value)
    assert not kernel_takes(query, key, value, attn_mask=mask)
    assert not kernel_takes(query, key, value, is_causal=True)
    assert not kernel_takes(query.float(), key.float(), value.float())
    assert not kernel_takes(query[..., :39], key[..., :39], value[..., :39])  # odd head dim
    assert not kernel_takes(query[:, :, :64], key[:, :, :64], value[:, :, :64])  # torch's is faster
    with KernelAttentionMode():
        routed = F.scaled_dot_product_attention(query, key, value)
        masked = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        float32 = F.scaled_dot_product_attention(query.float(), key.float(), value.float())
    assert torch.equal(routed, cpu_attention(query, key, value, 40**-0.5)[0])
    assert not torch.equal(routed, F.scaled_dot_product_attention(query, key, value))
    assert torch.equal(masked, F.scaled_dot_product_attention(query, key, value, attn_mask=mask))
    assert torch.equal(
        float32, F.scaled_dot_product_attention(query.float(), key.float(), value.float())
    )


def toy_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**sd_v1_4_toy_config()).train()


def step(model: UNet2DConditionModel, bf16: bool = True) -> torch.Tensor:
    """The prediction and gradients of one seeded loss, flattened into one vector: in bf16
    autocast, as the trainer's step runs it, or in fp32 (the reference)."""
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, model.config.cross_attention_dim, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        prediction = model(noisy, torch.tensor([10, 700]), encoder_hidden_states=text).sample
    prediction.float().square().mean().backward()
    grads = [p.grad.flatten() for p in model.parameters()]
    return torch.cat([prediction.detach().flatten().float(), *grads]).double()


def test_a_unet_on_the_kernel_is_as_exact_as_on_torchs() -> None:
    """Against the same UNet's fp32 step, the kernel's bf16 step is as close as torch's."""
    exact = step(toy_unet(), bf16=False)
    on_torch = step(toy_unet())
    model = toy_unet()
    attention_modules = sum(isinstance(m, Attention) for m in model.modules())
    assert use_kernel_attention(model, CPU) == attention_modules > 0
    assert use_kernel_attention(model, torch.device("meta")) == 0  # only on a CPU
    assert use_kernel_attention(model, CPU, torch.float32) == 0  # only for bf16 compute
    score_counts = []  # query tokens × key tokens of each attention call

    def record(module, args, kwargs) -> None:  # noqa: ANN001
        context = kwargs.get("encoder_hidden_states")
        queries = args[0].shape[1]
        score_counts.append(queries * (queries if context is None else context.shape[1]))

    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.profiler.profile() as profile:
        on_kernel = step(model)
    calls = {event.key: event.count for event in profile.key_averages()}
    routed = sum(count >= KERNEL_FORWARD_MIN_SCORES for count in score_counts)
    assert len(score_counts) == attention_modules and routed > 0
    assert calls.get("sd_distill::cpu_attention") == routed
    assert calls.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0) == (
        attention_modules - routed
    )
    assert relative_error(on_kernel, exact) < 1.1 * relative_error(on_torch, exact)


@pytest.mark.parametrize("setting", [True, "selective"])
def test_checkpointing_keeps_the_kernels_gradients(setting) -> None:
    """A recompute (`true`) or a kept output ("selective") of the kernel's op gives the
    gradients of no checkpointing bitwise, as with torch's attention."""
    plain = toy_unet()
    use_kernel_attention(plain, CPU)
    reference = step(plain)
    model = toy_unet()
    use_kernel_attention(model, CPU)
    enable_checkpointing(model, setting)
    assert torch.equal(step(model), reference)


def test_a_failed_build_leaves_torchs_kernel(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(kernels.CACHE_VARIABLE, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails every build
    kernels.load.cache_clear()
    try:
        assert kernels.load("attention_avx512", kernels.AVX512_BF16_FLAGS, ()) is None
        assert list(tmp_path.rglob("*.so")) == []  # nothing half-built is left to load later
    finally:
        kernels.load.cache_clear()


def test_a_build_is_reused_and_torch_is_one_setting_away(tmp_path, monkeypatch) -> None:
    """The first load builds into the cache, the next loads that build; with
    SD_DISTILL_ATTENTION=torch the kernel is off."""
    monkeypatch.setenv(kernels.CACHE_VARIABLE, str(tmp_path))
    try:
        kernels.load.cache_clear()
        assert kernels.load("attention_avx512", kernels.AVX512_BF16_FLAGS, ()) is not None
        (built,) = tmp_path.rglob("attention_avx512-*.so")
        modified = built.stat().st_mtime_ns
        kernels.load.cache_clear()
        assert kernels.load("attention_avx512", kernels.AVX512_BF16_FLAGS, ()) is not None
        assert built.stat().st_mtime_ns == modified and len(list(tmp_path.rglob("*.so"))) == 1
        monkeypatch.setenv("SD_DISTILL_ATTENTION", "torch")
        cpu_attention_module._library.cache_clear()
        assert not available()
        assert use_kernel_attention(toy_unet(), CPU) == 0
    finally:
        kernels.load.cache_clear()
        cpu_attention_module._library.cache_clear()
