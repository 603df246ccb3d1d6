"""Time the CPU attention kernel (`core.cpu_attention`) against torch's flash kernel.

Both kernels are timed at every shape. `core.cpu_attention` sends each pass to the kernel only
where it measured faster here (`kernel_forward_is_faster`, `kernel_backward_is_faster`): the
step totals are printed for torch's kernels, the kernel everywhere, and that routing.

At SD v1.4's attention shapes at 512 px, batch 1, bf16: the self-attention of each latent
resolution (64×64 = 4,096 tokens of 8 heads × 40, down to 8×8 × 160) and the cross-attention to
77 text tokens at the largest. Prints the median forward and backward milliseconds of each, and
how often a distillation step into the base student runs it (teacher forward, student forward,
student backward), so the step's share can be read off.

    .venv/bin/python benchmarks/attention_kernel.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cpu_attention import (  # noqa: E402
    available,
    cpu_attention,
    cpu_attention_backward,
    kernel_backward_is_faster,
    kernel_forward_is_faster,
)

# (name, query tokens, key tokens, heads, head dim, calls per step: teacher forward, student
# forward, student backward). SD v1.4 has 8 heads everywhere; its UNet has 2 transformers per
# down block and 3 per up block at each resolution with attention, 1 in the middle (8×8); the
# base student keeps 1 per down block, 2 per up block and no middle.
SHAPES = (
    ("self 64×64", 4096, 4096, 8, 40, (5, 3, 3)),
    ("self 32×32", 1024, 1024, 8, 80, (5, 3, 3)),
    ("self 16×16", 256, 256, 8, 160, (5, 3, 3)),
    ("self 8×8", 64, 64, 8, 160, (1, 0, 0)),
    ("cross 64×64", 4096, 77, 8, 40, (5, 3, 3)),
    ("cross 32×32", 1024, 77, 8, 80, (5, 3, 3)),
)


def median_ms(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_shape(queries: int, keys: int, heads: int, dim: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)

    def tensor(tokens: int) -> torch.Tensor:
        return torch.randn(1, heads, tokens, dim, generator=generator).bfloat16()

    q, k, v, grad_out = tensor(queries), tensor(keys), tensor(keys), tensor(queries)
    scale = dim**-0.5
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    out, lse = flash(q, k, v, 0.0, False)
    ours_out, ours_lse = cpu_attention(q, k, v, scale)
    return {
        "torch_forward": median_ms(lambda: flash(q, k, v, 0.0, False), repeats),
        "kernel_forward": median_ms(lambda: cpu_attention(q, k, v, scale), repeats),
        "torch_backward": median_ms(
            lambda: flash_backward(grad_out, q, k, v, out, lse, 0.0, False), repeats
        ),
        "kernel_backward": median_ms(
            lambda: cpu_attention_backward(grad_out, q, k, v, ours_out, ours_lse, scale), repeats
        ),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="only shapes up to this many query tokens"
    )
    args = parser.parse_args(argv)
    shapes = [shape for shape in SHAPES if args.max_tokens is None or shape[1] <= args.max_tokens]
    if not available():
        parser.exit(1, "the kernel does not run here (x86 with AVX512-BF16 and g++ needed)\n")
    rows = []
    for name, queries, keys, heads, dim, calls in shapes:
        rows.append(
            {"shape": name, "calls": calls, **time_shape(queries, keys, heads, dim, args.repeats)}
        )

    def step_ms(forward: str, backward: str, row: dict[str, Any]) -> float:
        teacher, student, student_backward = row["calls"]
        return (teacher + student) * row[forward] + student_backward * row[backward]

    totals = {
        side: sum(step_ms(f"{side}_forward", f"{side}_backward", row) for row in rows)
        for side in ("torch", "kernel")
    }
    totals["routed"] = 0.0
    for (_, queries, keys, *_), row in zip(shapes, rows, strict=True):
        forward = "kernel" if kernel_forward_is_faster(queries, keys) else "torch"
        backward = "kernel" if kernel_backward_is_faster(keys) else "torch"
        totals["routed"] += step_ms(f"{forward}_forward", f"{backward}_backward", row)
    result = {"threads": torch.get_num_threads(), "rows": rows, "step_ms": totals}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"attention at SD v1.4's shapes, 512 px, batch 1, bf16, {result['threads']} threads")
    print(
        f"{'shape':12} {'tokens':>11} {'heads×dim':>9}  {'forward ms torch/kernel':>24}  "
        f"{'backward ms torch/kernel':>25}  calls (teacher, student fwd, bwd)"
    )
    for (name, queries, keys, heads, dim, calls), row in zip(shapes, rows, strict=True):
        print(
            f"{name:12} {queries:>5}×{keys:<5} {heads:>4}×{dim:<4}  "
            f"{row['torch_forward']:>9.1f} / {row['kernel_forward']:<6.1f} "
            f"({row['torch_forward'] / row['kernel_forward']:.2f}×)  "
            f"{row['torch_backward']:>9.1f} / {row['kernel_backward']:<6.1f} "
            f"({row['torch_backward'] / row['kernel_backward']:.2f}×)  {calls}"
        )
    print(
        f"per distillation step: torch {totals['torch']:.0f} ms, the kernel everywhere "
        f"{totals['kernel']:.0f} ms, as routed {totals['routed']:.0f} ms"
    )
    return result


if __name__ == "__main__":
    main()
