"""Attention on the CPU through the project's AVX512-BF16 kernel (core/kernels/attention_*.cpp).

torch 2.14's CPU flash attention runs Stable Diffusion's attention at a third of the bf16 matmul
peak on CPUs without AMX. For one 4,096-token self-attention (8 heads of 40) on this project's
2-core machines: 166 ms forward and 314 ms backward, against the kernel's 78 and 202
(`benchmarks/attention_kernel.py`). A distillation step into the base student runs it 8 times
forward (5 in the teacher, 3 in the student) and 3 times backward.

How it plugs in. `use_kernel_attention(unet, device)` gives every attention module of a
diffusers model trained in bf16 on a CPU `KernelAttnProcessor`: diffusers' own
`AttnProcessor2_0`, run under a torch-function mode that sends its
`F.scaled_dot_product_attention` call to the `sd_distill::cpu_attention` op when the kernel
takes it (`kernel_takes`: bf16 CPU tensors, no mask, no dropout, not causal, an even head dim up
to 256, and a shape where it measured faster) and to PyTorch otherwise, so an fp32 run or a
masked call is unchanged. The op returns the output and each row's log-sum-exp as torch's flash
kernel does; its backward runs on the kernel from 1,024 keys up and on torch's flash backward
below, which reads the same (out, lse). It is a registered op, so selective activation
checkpointing can keep its output (`distill.activation_checkpointing`) and torch.compile treats
it as one opaque call.

`SD_DISTILL_ATTENTION=torch` leaves PyTorch's kernels everywhere.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.overrides import TorchFunctionMode

from core import kernels

SETTING_VARIABLE = "SD_DISTILL_ATTENTION"
MAX_HEAD_DIM = 256  # the kernel's register blocking holds 16 zmm lanes of output per row

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
# The kernel's work items (core/kernels/attention_avx512.cpp): query rows per forward item,
# keys per backward item, and the row padding of the backward's per-thread dQ sums.
FORWARD_QUERIES, BACKWARD_KEYS, BACKWARD_QUERIES = 32, 64, 64
# Where the kernel is the faster one (`benchmarks/attention_kernel.py`, this project's 2-core
# machines, SD v1.4's shapes): its forward from 256×256 tokens up (1.2-2.2× torch's; at 64×64
# tokens torch's is faster, and both take under a millisecond), its backward from 1,024 keys up
# (1.05× at 1,024, 1.56× at 4,096; torch's is faster at 256 keys and at 77 text tokens).
KERNEL_FORWARD_MIN_SCORES = 128 * 128  # query tokens × key tokens per head
KERNEL_BACKWARD_MIN_KEYS = 1024


def kernel_forward_is_faster(queries: int, keys: int) -> bool:
    return queries * keys >= KERNEL_FORWARD_MIN_SCORES


def kernel_backward_is_faster(keys: int) -> bool:
    return keys >= KERNEL_BACKWARD_MIN_KEYS


# ctypes signatures, by argument kind: p pointer, i int64, f float.
_SIGNATURES = {
    "attention_forward_pack_size": ("ii", _I64),
    "attention_forward_pack": ("ppiiiiiipii", None),
    "attention_forward": ("piiiiipiifpiiipii", ctypes.c_int),
    "attention_backward_pack_size": ("iii", _I64),
    "attention_backward_pack": ("pppp" + "i" * 13 + "pii", None),
    "attention_backward": ("piiiipiiipppiiifppiiipiii", ctypes.c_int),
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(SETTING_VARIABLE, "").lower() == "torch":
        return None
    if "amx_bf16" in kernels.cpu_flags():
        # torch's flash kernel packs for AMX's tile products there; the kernel's speed-up was
        # measured only on CPUs without AMX, so where AMX is, torch's kernel stays.
        return None
    library = kernels.load(
        "attention_avx512", kernels.AVX512_BF16_FLAGS, kernels.AVX512_BF16_CPU_FLAGS
    )
    if library is not None:
        kinds = {"p": _PTR, "i": _I64, "f": _F32}
        for name, (arguments, result) in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = [kinds[kind] for kind in arguments]
            function.restype = result
    return library


def available() -> bool:
    """Whether this machine runs the kernel (x86 with AVX512-BF16, a C++ compiler, not turned
    off by `SD_DISTILL_ATTENTION=torch`)."""
    return _library() is not None


_pools: dict[int, ThreadPoolExecutor] = {}


def _ranges(items: int) -> list[tuple[int, int]]:
    """[0, items) in one contiguous range per torch thread (at most one per item)."""
    workers = max(1, min(torch.get_num_threads(), items))
    return [(i * items // workers, (i + 1) * items // workers) for i in range(workers)]


def _run(work: Callable[[int, int, int], int], ranges: list[tuple[int, int]]) -> None:
    """`work(begin, end, worker)` for each range, each in its own pool thread (ctypes releases
    the GIL for the kernel's call)."""
    if len(ranges) == 1:
        codes = [work(*ranges[0], 0)]
    else:
        # One pool per process (a forked data worker gets its own); its threads start as needed.
        pool = _pools.get(os.getpid()) or _pools.setdefault(
            os.getpid(), ThreadPoolExecutor(max(os.cpu_count() or 1, torch.get_num_threads()))
        )
        codes = list(pool.map(lambda args: work(*args[1], args[0]), enumerate(ranges)))
    if any(codes):
        raise RuntimeError(f"the attention kernel refused its arguments (codes {codes})")


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


def kernel_reads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the operands are what the kernel reads: bf16 CPU (B, H, tokens, D) with each row
    contiguous, keys and values of one shape and strides (it packs both with the keys' strides),
    an even head dim up to 256, at least one key."""
    tensors = (query, key, value)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
        and all(t.dim() == 4 and t.stride(-1) == 1 for t in tensors)
        and key.shape == value.shape
        and key.stride() == value.stride()
        and query.shape[:2] == key.shape[:2]
        and query.shape[-1] == key.shape[-1]
        and query.shape[-1] % 2 == 0
        and query.shape[-1] <= MAX_HEAD_DIM
        and key.shape[2] > 0
    )


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    torch._check(
        kernel_reads(query, key, value),
        lambda: (
            "cpu_attention reads bf16 CPU (B, H, tokens, D) operands, rows contiguous, keys "
            "and values alike, an even head dim up to 256 (core.cpu_attention.kernel_reads)"
        ),
    )


def _flash_layout(like: torch.Tensor, tokens: int) -> torch.Tensor:
    """An empty (B, H, tokens, D) tensor stored as (B, tokens, H, D), as torch's flash kernel
    stores its output: the layout diffusers' (B, tokens, H·D) projections are views of."""
    batch, heads, _, dim = like.shape
    return like.new_empty(batch, tokens, heads, dim).transpose(1, 2)


@torch.library.custom_op("sd_distill::cpu_attention", mutates_args=())
def cpu_attention(
    query: torch.Tensor,  # (B, H, L, D) bf16, each row contiguous
    key: torch.Tensor,  # (B, H, S, D) bf16
    value: torch.Tensor,  # (B, H, S, D) bf16, the same strides as key
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ) v as (B, H, L, D) bf16 (stored as (B, L, H, D), as torch's flash
    kernel stores it), and each query row's log-sum-exp of the scaled scores, (B, H, L) fp32."""
    library = _library()
    assert library is not None, "cpu_attention called where the kernel is not available"
    _check_inputs(query, key, value)
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    packed = query.new_empty(batch * heads, library.attention_forward_pack_size(keys, dim))
    key_strides = key.stride()[:3]

    def pack(begin: int, end: int, _worker: int) -> int:
        library.attention_forward_pack(
            key.data_ptr(), value.data_ptr(), heads, *key_strides, keys, dim,
            packed.data_ptr(), begin, end,
        )  # fmt: skip
        return 0

    _run(pack, _ranges(batch * heads))
    out = _flash_layout(query, length)
    lse = query.new_empty(batch, heads, length, dtype=torch.float32)

    def attend(begin: int, end: int, _worker: int) -> int:
        return library.attention_forward(
            query.data_ptr(), heads, *query.stride()[:3], length, packed.data_ptr(), keys, dim,
            scale, out.data_ptr(), *out.stride()[:3], lse.data_ptr(), begin, end,
        )  # fmt: skip

    _run(attend, _ranges(batch * heads * _ceil_div(length, FORWARD_QUERIES)))
    return out, lse


@cpu_attention.register_fake
def _(query, key, value, scale):  # noqa: ANN001, ANN202 (torch.library's signature)
    batch, heads, length, _ = query.shape
    return _flash_layout(query, length), query.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("sd_distill::cpu_attention_backward", mutates_args=())
def cpu_attention_backward(
    grad_out: torch.Tensor,  # (B, H, L, D) bf16
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,  # the forward's (B, H, L, D)
    lse: torch.Tensor,  # the forward's (B, H, L) fp32
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `cpu_attention` on the kernel, from the forward's output and lse; each
    stored as (B, L or S, H, D), like the forward's output. Its own op, so that a compiled
    backward traces it as one call."""
    library = _library()
    assert library is not None, "cpu_attention_backward called where the kernel is not available"
    _check_inputs(query, key, value)
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    lse = lse.contiguous()
    # Σ_d dO·O per query row, (B, H, L) fp32: the softmax's Jacobian term.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    packed = query.new_empty(batch * heads, library.attention_backward_pack_size(length, keys, dim))
    strides = (*query.stride()[:3], *key.stride()[:3], *grad_out.stride()[:3])

    def pack(begin: int, end: int, _worker: int) -> int:
        library.attention_backward_pack(
            query.data_ptr(), key.data_ptr(), value.data_ptr(), grad_out.data_ptr(), heads,
            *strides, length, keys, dim, packed.data_ptr(), begin, end,
        )  # fmt: skip
        return 0

    _run(pack, _ranges(batch * heads))
    grad_key, grad_value = _flash_layout(key, keys), _flash_layout(value, keys)
    tiles = _ceil_div(keys, BACKWARD_KEYS)
    ranges = _ranges(batch * heads * tiles)
    # Items of one head share its query rows: each thread sums dq in fp32 for the heads of its
    # items, (heads, padded rows, width), and the sums are added up below.
    padded_length = _ceil_div(length, BACKWARD_QUERIES) * BACKWARD_QUERIES
    width = _ceil_div(dim, 16) * 16
    head_spans = [(begin // tiles, (end - 1) // tiles + 1) for begin, end in ranges]
    sums = [torch.zeros(last - first, padded_length, width) for first, last in head_spans]

    def differentiate(begin: int, end: int, worker: int) -> int:
        return library.attention_backward(
            query.data_ptr(), heads, *query.stride()[:3],
            grad_out.data_ptr(), *grad_out.stride()[:3],
            lse.data_ptr(), delta.data_ptr(), packed.data_ptr(), length, keys, dim, scale,
            grad_key.data_ptr(), grad_value.data_ptr(), *grad_key.stride()[:3],
            sums[worker].data_ptr(), head_spans[worker][0], begin, end,
        )  # fmt: skip

    _run(differentiate, ranges)
    total = sums[0]
    if len(sums) > 1:
        total = torch.zeros(batch * heads, padded_length, width)
        for (first, last), part in zip(head_spans, sums, strict=True):
            total[first:last] += part
    grad_query = _flash_layout(query, length)
    grad_query.copy_(total.view(batch, heads, padded_length, width)[:, :, :length, :dim])
    return grad_query, grad_key, grad_value


@cpu_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, scale):  # noqa: ANN001, ANN202
    return tuple(_flash_layout(t, t.shape[2]) for t in (query, key, value))


def _save_for_backward(ctx, inputs, output) -> None:  # noqa: ANN001
    query, key, value, scale = inputs
    ctx.save_for_backward(query, key, value, *output)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):  # noqa: ANN001, ANN202
    query, key, value, out, lse = ctx.saved_tensors
    if kernel_backward_is_faster(key.shape[2]):
        grads = cpu_attention_backward(grad_out, query, key, value, out, lse, ctx.scale)
    else:  # the forward's (out, lse) are what torch's flash backward expects of its forward
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, lse, 0.0, False, scale=ctx.scale
        )
    return (*grads, None)


cpu_attention.register_autograd(_backward, setup_context=_save_for_backward)


def kernel_takes(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> bool:
    """Whether `F.scaled_dot_product_attention` with these arguments goes to the kernel: it
    reads them, and measured faster at their shape."""
    return (
        attn_mask is None
        and dropout_p == 0.0
        and not is_causal
        and not enable_gqa
        and kernel_reads(query, key, value)
        and kernel_forward_is_faster(query.shape[2], key.shape[2])
        and available()
    )


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    return {**dict(zip(names, args, strict=False)), **kwargs}


class KernelAttentionMode(TorchFunctionMode):
    """Sends each `F.scaled_dot_product_attention` call the kernel can take to it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            arguments = _sdpa_arguments(args, kwargs)
            if kernel_takes(**arguments):
                query = arguments["query"]
                scale = arguments.get("scale")
                scale = query.shape[-1] ** -0.5 if scale is None else scale
                return cpu_attention(query, arguments["key"], arguments["value"], scale)[0]
        return func(*args, **kwargs)


class KernelAttnProcessor(AttnProcessor2_0):
    """diffusers' `AttnProcessor2_0`, its attention product on the kernel where it can run."""

    def __call__(self, attn: Attention, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        with KernelAttentionMode():
            return super().__call__(attn, *args, **kwargs)

    # diffusers passes a processor only the cross_attention_kwargs its signature names (0.42,
    # `Attention.forward`): the parent's, not (*args, **kwargs).
    __call__.__signature__ = inspect.signature(AttnProcessor2_0.__call__)


def use_kernel_attention(
    model: nn.Module, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16
) -> int:
    """Give every attention module of `model`, run on `device` in `compute_dtype`, that has
    diffusers' default processor the kernel's; returns how many (0 off a CPU, for a compute
    dtype other than bf16, or where the kernel cannot run)."""
    if device.type != "cpu" or compute_dtype != torch.bfloat16 or not available():
        return 0
    processor, switched = KernelAttnProcessor(), 0
    for module in model.modules():
        if isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
            module.set_processor(processor)
            switched += 1
    return switched
