"""Training checkpoints: atomic, resumable, pruned to the last K.

    <run_dir>/checkpoints/stage01-step0000500/
        student.safetensors     the student's weights
        ema.safetensors         EMA shadow weights (when EMA is on)
        optimizer.pt            optimizer + LR-schedule state (loaded with weights_only=True)
        state.json              stage index and name, step, counters

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash leaves
the previous checkpoint intact and never a half-written one. The randomness of a step (noise,
timesteps, data order, classifier-free dropout) is a pure function of (seed, stage, step, rank):
resuming needs no RNG state, which is what makes an interrupted run end bitwise-equal to an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^stage(\d{2})-step(\d{7})$")
STUDENT_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE = (
    "student.safetensors",
    "ema.safetensors",
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
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint atomically, then delete all but the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.stage_index, state.step)
    temporary = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(_contiguous_cpu(student), str(temporary / STUDENT_FILE))
    if ema is not None:
        save_file(_contiguous_cpu(ema), str(temporary / EMA_FILE))
    torch.save(optimizer, temporary / OPTIMIZER_FILE)
    (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    if final.exists():  # re-saving the same step (e.g. stage end right after a periodic save)
        shutil.rmtree(final)
    os.replace(temporary, final)
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


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and crashed temporary folders)."""
    removed = [c.path for c in list_checkpoints(root)[:-keep_last]]
    removed += [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
