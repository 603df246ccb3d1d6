"""Time the CPU attention kernel (`core.cpu_attention`) against torch's flash kernel.

Each pass is timed on its own, whatever `core.cpu_attention` routes to at this shape (it sends
the shapes where torch's kernel measured faster to torch's, chosen from this script's figures).

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

from core.cpu_attention import available, cpu_attention, cpu_attention_backward  # noqa: E402

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
    args = parser.parse_args(argv)
    if not available():
        parser.exit(1, "the kernel does not run here (x86 with AVX512-BF16 and g++ needed)\n")
    rows = []
    for name, queries, keys, heads, dim, calls in SHAPES:
        rows.append(
            {"shape": name, "calls": calls, **time_shape(queries, keys, heads, dim, args.repeats)}
        )
    totals = {
        side: sum(
            row["calls"][0] * row[f"{side}_forward"]
            + row["calls"][1] * row[f"{side}_forward"]
            + row["calls"][2] * row[f"{side}_backward"]
            for row in rows
        )
        for side in ("torch", "kernel")
    }
    result = {"threads": torch.get_num_threads(), "rows": rows, "step_ms": totals}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"attention at SD v1.4's shapes, 512 px, batch 1, bf16, {result['threads']} threads")
    print(
        f"{'shape':12} {'tokens':>11} {'heads×dim':>9}  {'forward ms torch/kernel':>24}  "
        f"{'backward ms torch/kernel':>25}  calls (teacher, student fwd, bwd)"
    )
    for (name, queries, keys, heads, dim, calls), row in zip(SHAPES, rows, strict=True):
        print(
            f"{name:12} {queries:>5}×{keys:<5} {heads:>4}×{dim:<4}  "
            f"{row['torch_forward']:>9.1f} / {row['kernel_forward']:<6.1f} "
            f"({row['torch_forward'] / row['kernel_forward']:.2f}×)  "
            f"{row['torch_backward']:>9.1f} / {row['kernel_backward']:<6.1f} "
            f"({row['torch_backward'] / row['kernel_backward']:.2f}×)  {calls}"
        )
    print(
        f"per distillation step: torch {totals['torch']:.0f} ms, kernel {totals['kernel']:.0f} ms"
    )
    return result


if __name__ == "__main__":
    main()
