"""`training.compile`: regional `torch.compile` of the student and the stage teacher.

Regional, not whole-model: only the blocks a UNet repeats are compiled (its transformer blocks
and ResNet blocks), each class once per shape, so compile time grows with the number of distinct
blocks rather than the depth of the network (PyTorch's regional compilation recipe; diffusers'
`compile_repeated_blocks` does the same for its `_repeated_blocks`). Three things follow:

- the feature taps stay where they were: a tap on a stage output (`down_blocks.1`, `mid_block`)
  is a hook on a module outside every compiled region, so it runs eagerly and breaks no graph; a
  block holding a tapped module (an attention projection) is left eager (`compile_regions`);
- the modules keep their names and their place in the tree (`nn.Module.compile` compiles in
  place), so checkpoints, the EMA, DDP/FSDP wrapping and export see the same network;
- gradient checkpointing wraps the compiled block: its recompute calls the same graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distill.taps import unwrap_model

# The blocks a diffusers UNet repeats; every other module runs eagerly between them.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def resolve_compile(setting: str | bool, device_type: str) -> bool:
    """`training.compile` as a decision: "auto" compiles on CUDA only. On the 2-core CPUs this
    project is developed on, compiled blocks did not pay for their compile time (README,
    performance); a CPU run compiles when asked to (`compile: true`)."""
    if setting == "auto":
        return device_type == "cuda"
    return bool(setting)


# torch.compile's backend. `SD_DISTILL_COMPILE_BACKEND=aot_eager` traces the same graphs with no
# code generation (the multi-process tests: inductor's C++ build takes minutes on 2 cores).
BACKEND_VARIABLE = "SD_DISTILL_COMPILE_BACKEND"


def default_backend() -> str:
    return os.environ.get(BACKEND_VARIABLE, "inductor")


def compile_regions(
    model: nn.Module,
    *,
    eager_paths: Iterable[str] = (),
    blocks: Sequence[str] = REPEATED_BLOCKS,
    backend: str | None = None,
    options: dict[str, Any] | None = None,
) -> int:
    """Compile, in place, every submodule of `model` (wrappers peeled) whose class is one of
    `blocks`, except those holding one of `eager_paths` (the tapped modules); returns how many.
    A block compiled before is left as it is (a teacher shared by two stages is compiled once).

    Why a tapped block stays eager: blocks of one shape share one compiled graph, and a forward
    hook traced into it is the first block's hook. Measured with torch 2.14: the hook of
    `down_blocks.1...attn1.to_q` then ran for `up_blocks.1...attn1.to_q` too, storing that
    layer's output under the other's name; `tests/distill/test_compile.py` keeps it out.
    """
    tapped = tuple(eager_paths)
    backend = backend or default_backend()
    compiled = 0
    for name, module in unwrap_model(model).named_modules():
        if type(module).__name__ in blocks and not any(
            path == name or path.startswith(f"{name}.") for path in tapped
        ):
            if getattr(module, "_compiled_call_impl", None) is None:
                # Static shapes: each block shape gets its own specialised graph (SD v1.4's
                # UNet pair has ~20 of them), compiled in the first step and then reused.
                module.compile(backend=backend, dynamic=False, **(options or {}))
            compiled += 1
    # Dynamo guards on each block class's code: every (weight shape, input shape) variant is
    # one more compiled entry. Its default limit (8 in torch 2.14) would silently run the rest
    # eagerly; one entry per compiled block is the most a network can need.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, compiled)
    if compiled == 0:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has none of the blocks {blocks}")
    return compiled


def compiled_block_count(model: nn.Module) -> int:
    """How many submodules of `model` run compiled (0 for an eager network)."""
    return sum(
        getattr(module, "_compiled_call_impl", None) is not None
        for module in unwrap_model(model).modules()
    )


def dynamo_counters() -> dict[str, int]:
    """Dynamo's process-wide counters that say whether compilation settled: graphs captured and
    graph breaks (`torch._dynamo.utils.counters`, torch 2.14)."""
    counters = torch._dynamo.utils.counters
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
