"""Feature taps: capture intermediate module outputs by module path, with hooks always removed.

Modelled on torchdistill's `core/forward_hook.py`: hooks are a managed object, registered by path
and removed on exit, never closures with thrown-away handles. Paths are relative to the unwrapped
model (`down_blocks.0`, `mid_block`, `up_blocks.2.attentions.0`), so the same recipe works on one
CPU and under DDP/FSDP/torch.compile; BK-SDM and distill-sd both broke under DDP because their
hook paths included or omitted the wrapper's `module.` prefix.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from core.errors import UserInputError


def _wrapped_module(model: nn.Module) -> nn.Module | None:
    """The module inside a training wrapper, or None if `model` is not a wrapper."""
    # torch.compile's OptimizedModule keeps the original as `_orig_mod`.
    if "_orig_mod" in model._modules:
        return model._modules["_orig_mod"]
    # FSDP (FullyShardedDataParallel) keeps it as `_fsdp_wrapped_module` (`.module` is a property).
    if "_fsdp_wrapped_module" in model._modules:
        return model._modules["_fsdp_wrapped_module"]
    # DDP and DataParallel keep it as `.module`; so does DeepSpeed's engine, whose class can only
    # exist if deepspeed was imported (we never import it ourselves).
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and hasattr(deepspeed, "DeepSpeedEngine"):
        wrappers += (deepspeed.DeepSpeedEngine,)
    if isinstance(model, wrappers):
        return model.module
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel, FSDP and torch.compile wrappers, repeatedly (e.g. DDP(compile(m)))."""
    inner = _wrapped_module(model)
    while inner is not None:
        model = inner
        inner = _wrapped_module(model)
    return model


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path, peeling wrappers at every level.

    Peeling per level matters for FSDP with an auto-wrap policy, which puts a wrapper (and an
    extra `_fsdp_wrapped_module.` segment) around inner blocks. The module returned is the one
    sitting at the path, wrapper or not: its output is the block's output either way.
    """
    module = model
    walked: list[str] = []
    for name in path.split("."):
        parent = unwrap_model(module)
        if name not in parent._modules or parent._modules[name] is None:
            where = ".".join(walked) or "the model"
            children = ", ".join(n for n, m in parent._modules.items() if m is not None)
            raise UserInputError(
                f"unknown module path {path!r}: {where} has no submodule {name!r} "
                f"(it has: {children or 'none'})"
            )
        module = parent._modules[name]
        walked.append(name)
    return module


def _first_tensor(output: object, path: str) -> Tensor:
    """A block's main output: tuples/lists give their first element (down blocks return
    (hidden_states, residuals)); diffusers/transformers output objects their first field."""
    if isinstance(output, tuple | list) and output:
        output = output[0]
    elif isinstance(output, Mapping) and output:
        output = next(iter(output.values()))
    if not isinstance(output, Tensor):
        raise TypeError(f"module {path!r} returned {type(output).__name__}, not a tensor to tap")
    return output


class FeatureTaps:
    """Context manager capturing the outputs of modules at the given paths on every forward.

    >>> with FeatureTaps(accelerator_wrapped_unet, ["down_blocks.0", "mid_block"]) as taps:
    ...     unet(latents, t, text_embeddings)
    ...     taps.features["mid_block"]  # (B, C, H, W)

    Paths are resolved when the object is built, so a wrong path fails before any forward.
    `features` maps path → latest output (a module called twice in one forward keeps its last
    output); call `clear()` between steps to drop references to the previous step's graph.
    `detach=True` stores detached outputs, for the teacher side.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], detach: bool = False) -> None:
        root = unwrap_model(model)
        # dict.fromkeys: two losses tapping the same path share one hook.
        self._tapped = {path: resolve_module(root, path) for path in dict.fromkeys(paths)}
        self.detach = detach
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def paths(self) -> list[str]:
        return list(self._tapped)

    def __enter__(self) -> FeatureTaps:
        if self._handles:
            raise RuntimeError("FeatureTaps is already active; it cannot be entered twice")
        try:
            for path, module in self._tapped.items():
                hook = functools.partial(self._store, path)
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove_hooks()

    def clear(self) -> None:
        self.features.clear()

    def _store(self, path: str, module: nn.Module, inputs: tuple, output: object) -> None:
        feature = _first_tensor(output, path)
        self.features[path] = feature.detach() if self.detach else feature

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()
