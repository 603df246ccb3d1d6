"""The guarded optimizer update: no non-finite gradient ever reaches the weights.

A NaN or Inf gradient can come with a finite loss (bf16 has no GradScaler to catch it; an
overflow in one layer's backward is enough). Clipping does not help: the norm itself is NaN and
the clip coefficient spreads it to every gradient. So the update is applied only when the
gradient norm is finite; under fp16 accelerate's GradScaler makes that call itself (and lowers
its scale), and the optimizer reports whether it skipped.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator


def guarded_update(
    accelerator: Accelerator,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    loss_finite: torch.Tensor | None = None,
) -> tuple[bool, float]:
    """Clip and step the (prepared) optimizer unless a gradient (or, given `loss_finite`, the
    step's loss) is non-finite; always zero the gradients. Returns (applied, gradient norm before
    clipping, of the process-averaged gradient).

    `loss_finite`: a 0-d bool tensor on the device, the same on every process (the trainer
    reduces it), so that nothing before this call waits for the device: this call reads it and
    the norm together, the step's one host synchronisation.

    When not applied, the weights and the optimizer state are exactly as before the call. The
    norm is the same on every process (DDP all-reduces the gradients first), so all processes
    agree on the decision.
    """
    # With max_grad_norm None the clip only measures: an infinite threshold never scales.
    norm = accelerator.clip_grad_norm_(student.parameters(), max_grad_norm or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    checks = [torch.as_tensor(norm, dtype=torch.float32).reshape(())]
    if loss_finite is not None:
        checks.append(loss_finite.to(checks[0].device, torch.float32).reshape(()))
    norm_value, *loss_flag = torch.stack(checks).tolist()  # the one host synchronisation
    loss_ok = not loss_flag or loss_flag[0] == 1.0
    scaler = accelerator.scaler
    if scaler is not None:
        # GradScaler.step skips non-finite gradients, then update() lowers the scale: a lower
        # scale is the one reliable sign of a skip. (accelerate 1.15's `step_was_skipped` says
        # False for fused AdamW, which receives found_inf and skips inside its own kernel.)
        scale = scaler.get_scale()
        if loss_ok:
            optimizer.step()  # accelerate's: scaler.step, then scaler.update
        else:
            scaler.update()  # a non-finite loss with finite gradients: no step, scaler in order
        applied = loss_ok and scaler.get_scale() >= scale
    else:
        applied = loss_ok and math.isfinite(norm_value)
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied, norm_value


def scaler_is_calibrating(accelerator: Accelerator) -> bool:
    """Whether an fp16 GradScaler may still be lowering its scale: its first overflows are how it
    calibrates (from 2^16), not a diverging run, so they do not count toward stopping it."""
    return accelerator.scaler is not None and accelerator.scaler.get_scale() >= 1.0
