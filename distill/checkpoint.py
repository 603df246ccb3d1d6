"""Training checkpoints: atomic, resumable, pruned to the last K.

    <run_dir>/checkpoints/stage01-step0000500/
        student.safetensors     the student's weights
        ema.safetensors         EMA shadow weights (when EMA is on)
        stage.safetensors       the stage kind's own tensors (e.g. a target network), if any
        optimizer.pt            optimizer, LR-schedule and EMA counters (weights_only=True)
        state.json              stage index and name, step, counters

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves
the previous checkpoint intact and never a half-written one. The randomness of a step (noise,
timesteps, data order, classifier-free dropout) is a pure function of (seed, stage, step, rank):
resuming needs no RNG state, which is what makes an interrupted run end bitwise-equal to an
uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from core.atomic import atomic_folder
from core.errors import UserInputError
from distill.distributed_state import (
    full_tensors,
    like,
    load_optimizer_state,
    load_student_state,
    optimizer_state,
    student_state,
)

_NAME = re.compile(r"^stage(\d{2})-step(\d{7})$")
STUDENT_FILE, EMA_FILE, KIND_FILE, OPTIMIZER_FILE, STATE_FILE = (
    "student.safetensors",
    "ema.safetensors",
    "stage.safetensors",
    "optimizer.pt",
    "state.json",
)


@dataclass(frozen=True)
class TrainingState:
    stage_index: int
    stage_name: str
    step: int  # optimizer steps completed in this stage
    nonfinite_skipped: int = 0


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: TrainingState

    def load_student(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / STUDENT_FILE)

    def load_ema(self) -> dict[str, torch.Tensor] | None:
        path = self.path / EMA_FILE
        return load_file(path) if path.exists() else None

    def load_kind_state(self) -> dict[str, torch.Tensor]:
        path = self.path / KIND_FILE
        return load_file(path) if path.exists() else {}

    def load_optimizer(self) -> dict[str, Any]:
        return torch.load(self.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def checkpoint_name(stage_index: int, step: int) -> str:
    return f"stage{stage_index:02d}-step{step:07d}"


def save_checkpoint(
    root: Path,
    state: TrainingState,
    *,
    student: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    kind_state: dict[str, torch.Tensor] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest `keep_last`."""
    final = root / checkpoint_name(state.stage_index, state.step)
    # An existing `final` (the stage end right after a periodic save of the same step) is
    # replaced whole; the files are flushed to disk before the folder is renamed into place.
    with atomic_folder(final) as temporary:
        save_file(_contiguous_cpu(student), str(temporary / STUDENT_FILE))
        if ema is not None:
            save_file(_contiguous_cpu(ema), str(temporary / EMA_FILE))
        if kind_state:
            save_file(_contiguous_cpu(kind_state), str(temporary / KIND_FILE))
        torch.save(optimizer, temporary / OPTIMIZER_FILE)
        (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first. Leftover temporary folders are ignored."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            state = TrainingState(**json.loads((path / STATE_FILE).read_text()))
            found.append(Checkpoint(path, state))
    return sorted(found, key=lambda c: (c.state.stage_index, c.state.step))


def latest_checkpoint(root: Path) -> Checkpoint | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


@dataclass(frozen=True)
class ResumePlan:
    """Where a run (re)starts: the first stage to run, the checkpoint to restore in it (None: the
    stage starts at step 0), and the checkpoints a restarted stage leaves behind (to delete)."""

    first_stage: int
    checkpoint: Checkpoint | None
    discarded: list[Checkpoint]


def plan_resume(
    root: Path,
    stage_steps: list[int],
    saved: Callable[[int], bool],
    *,
    resume: bool | None = None,
    restart_stage: bool = False,
) -> ResumePlan:
    """The run's resume policy.

    `resume` True = must resume (no checkpoint is an error), False = start afresh, None = resume
    when a checkpoint exists. A checkpoint at the end of a stage whose final student was saved
    (`saved(index)`) means that stage is done: the run goes on with the next one. `restart_stage`
    trains the stage of the latest checkpoint again from its start (its checkpoints discarded).
    """
    checkpoint = latest_checkpoint(root) if resume is not False else None
    if resume is True and checkpoint is None:
        raise UserInputError(f"--resume: no checkpoint in {str(root)!r}")
    if checkpoint is None:
        return ResumePlan(0, None, [])
    index = checkpoint.state.stage_index
    if checkpoint.state.step >= stage_steps[index] and saved(index):
        return ResumePlan(index + 1, None, [])
    if restart_stage:
        stale = [c for c in list_checkpoints(root) if c.state.stage_index == index]
        return ResumePlan(index, None, stale)
    return ResumePlan(index, checkpoint, [])


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and crashed temporary folders)."""
    removed = [c.path for c in list_checkpoints(root)[:-keep_last]]
    removed += [
        p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))
    ]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- training objects


def save_training_checkpoint(
    root: Path,
    state: TrainingState,
    *,
    accelerator: Accelerator,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: EMAModel | None,
    kind_state: dict[str, torch.Tensor] | None = None,
    keep_last: int | None = None,
) -> Path:
    """`save_checkpoint` for the objects one stage trains with (the prepared student).

    Collective: every process calls it (an FSDP student is gathered shard by shard), the main
    process writes. The EMA's shadow weights go to ema.safetensors as tensors "0", "1", ... in
    parameter order; its counters and the fp16 GradScaler's state (scale, growth tracker) go to
    optimizer.pt beside the optimizer's; the stage kind's own tensors (`kind_state`, whole) go to
    stage.safetensors. Weights that are not all finite are never written
    (NonFiniteWeights, raised on every process): the last checkpoint on disk stays the last good
    one.
    """
    bad = _first_nonfinite(student, ema, kind_state or {})
    if accelerator.reduce(
        torch.tensor([float(bad is not None)], device=accelerator.device), reduction="sum"
    ).item():
        raise NonFiniteWeights(
            f"{bad or 'a tensor on another process'} is not finite; checkpoint not written"
        )
    student_tensors = student_state(accelerator, student)
    optimizer_tensors = optimizer_state(optimizer)
    ema_tensors, ema_state = None, None
    if ema is not None:
        ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        ema_tensors = {f"{i}": p for i, p in enumerate(full_tensors(ema.shadow_params))}
    final = root / checkpoint_name(state.stage_index, state.step)
    if accelerator.is_main_process:
        scaler = accelerator.scaler
        final = save_checkpoint(
            root,
            state,
            student=student_tensors,
            ema=ema_tensors,
            kind_state=kind_state,
            optimizer={
                "optimizer": optimizer_tensors,
                "lr_scheduler": lr_scheduler.state_dict(),
                "ema": ema_state,
                "scaler": scaler.state_dict() if scaler is not None else None,
            },
            keep_last=keep_last,
        )
    accelerator.wait_for_everyone()
    return final


def _first_nonfinite(
    student: torch.nn.Module, ema: EMAModel | None, kind_state: dict[str, torch.Tensor]
) -> str | None:
    """The first student, EMA or stage-kind tensor (this process's part of it) with NaN/Inf."""
    for name, tensor in student.named_parameters():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if not torch.isfinite(local).all():
            return f"student tensor {name.removeprefix('module.')}"
    for index, tensor in enumerate(ema.shadow_params if ema is not None else []):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if not torch.isfinite(local).all():
            return f"EMA tensor {index}"
    for name, tensor in kind_state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"stage tensor {name}"
    return None


class NonFiniteWeights(RuntimeError):
    """Weights with NaN/Inf were about to be checkpointed."""


def restore_training_checkpoint(
    checkpoint: Checkpoint,
    *,
    accelerator: Accelerator,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: EMAModel | None,
) -> None:
    """Load what `save_training_checkpoint` wrote into the prepared training objects (every
    process reads the checkpoint and takes its part)."""
    state = checkpoint.load_optimizer()
    load_student_state(accelerator, student, checkpoint.load_student())
    load_optimizer_state(optimizer, state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is None:
        return
    shadow = checkpoint.load_ema()
    if shadow is None or state.get("ema") is None:
        raise UserInputError(f"checkpoint {checkpoint.path} has no EMA weights; EMA is on")
    shadows = [like(template, shadow[f"{i}"]) for i, template in enumerate(ema.shadow_params)]
    ema.load_state_dict(state["ema"] | {"shadow_params": shadows})
