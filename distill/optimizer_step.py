"""One optimizer step, for every stage kind: micro-batches -> backward -> guarded update -> EMA.

The trainer calls `optimizer_step` once per step; `benchmarks/sd_step.py` times the same function
at Stable Diffusion scale. Nothing in it waits for the device but the guard's one read of the
gradient norm and the loss flag (`distill.update.guarded_update`): the loss terms stay on the
device (`PendingTerms`) until a log step fetches them, so a GPU runs ahead of the host.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from distill.precision import at_least_fp32
from distill.taps import unwrap_model
from distill.update import guarded_update

# One micro-batch's loss: (weighted total, raw terms detached), computed under the run's autocast.
LossStep = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class PendingTerms:
    """One step's loss terms and total, still on the device (local means over its micro-batches):
    read only when a log step needs them (`fetch`)."""

    names: list[str]
    values: torch.Tensor  # (len(names) + 1,): the terms, then the weighted total

    def fetch(self, accelerator: Accelerator) -> tuple[dict[str, float], float]:
        """(terms, total) as means over processes, i.e. over the whole global batch. Collective:
        every process calls it at the same step."""
        means = accelerator.reduce(self.values, reduction="mean").tolist()
        return dict(zip(self.names, means[:-1], strict=True)), means[-1]


@dataclass(frozen=True)
class StepOutcome:
    applied: bool  # False: the loss or the gradient was not finite; nothing moved
    grad_norm: float  # before clipping, of the process-averaged gradient
    loss_finite: bool  # on every process (read from the device only for a skipped step)
    terms: PendingTerms


class PhaseClock(Protocol):
    """Marks the end of each phase of a step (the benchmark's split; the trainer passes none)."""

    def mark(self, phase: str) -> None: ...


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_step: LossStep,
    *,
    accumulation: int,
    max_grad_norm: float | None,
    ema: EMAModel | None = None,
    clock: PhaseClock | None = None,
) -> StepOutcome:
    """`accumulation` micro-batches of `loss_step` through backward, then the guarded update and
    (when applied) the EMA.

    A non-finite loss still runs its backward: its gradient is then NaN on every process (DDP
    and FSDP reduce gradients), so no process waits in a collective that another skipped, and
    the guard refuses the step everywhere. The loss flag is reduced over processes all the same,
    for a non-finite loss whose gradient happens to be finite.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    total_sum = torch.zeros((), device=accelerator.device)
    loss_finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    for micro in range(accumulation):
        with ExitStack() as stack:
            if micro < accumulation - 1:  # gradients are all-reduced once, at the last
                stack.enter_context(accelerator.no_sync(model))
            total, terms = loss_step()
            _mark(clock, "forward")
            loss_finite &= torch.isfinite(total.detach())
            accelerator.backward(total / accumulation)
            _mark(clock, "backward")
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + at_least_fp32(value) / accumulation
        total_sum = total_sum + at_least_fp32(total.detach()) / accumulation
    if accelerator.num_processes > 1:
        failed = accelerator.reduce((~loss_finite).float(), reduction="sum")
        loss_finite = failed == 0
    applied, grad_norm = guarded_update(
        accelerator, model, optimizer, max_grad_norm, loss_finite=loss_finite
    )
    _mark(clock, "optimizer")
    if applied and ema is not None:
        ema.step(unwrap_model(model).parameters())
        _mark(clock, "ema")
    return StepOutcome(
        applied=applied,
        grad_norm=grad_norm,
        loss_finite=True if applied else bool(loss_finite),
        terms=PendingTerms(list(sums), torch.stack([*sums.values(), total_sum])),
    )


def _mark(clock: PhaseClock | None, phase: str) -> None:
    if clock is not None:
        clock.mark(phase)
