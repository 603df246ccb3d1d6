"""The run folder: where each of a run's files lives, and the writes that must be atomic.

RUN/recipe.yaml            the resolved recipe (a rerun of another recipe is refused)
RUN/init_report.json       which teacher tensor initialized each student tensor
RUN/provenance.json        what each stage trained from (distill.provenance)
RUN/logs/                  metrics.jsonl and tensorboard events
RUN/checkpoints/           stageNN-stepNNNNNNN/ (distill.checkpoint)
RUN/stages/NN-name/unet/   each stage's final student (EMA weights), diffusers format
RUN/samples/               validation grids, NN-name-stepNNNNNNN.png
RUN/student_pipeline/      the last stage's student with its teacher's other components
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel

from core.atomic import atomic_folder, write_text_atomic
from distill.recipe import Recipe


class RunFolder:
    def __init__(self, root: str | Path, stage_names: Sequence[str]) -> None:
        self.root = Path(root)
        self.stage_names = list(stage_names)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics_log(self) -> Path:
        return self.logs / "metrics.jsonl"

    @property
    def student_pipeline(self) -> Path:
        return self.root / "student_pipeline"

    def stage_dir(self, index: int) -> Path:
        return self.root / "stages" / f"{index + 1:02d}-{self.stage_names[index]}"

    def stage_unet(self, index: int) -> Path:
        return self.stage_dir(index) / "unet"

    def stage_finished(self, index: int) -> bool:
        return self.stage_unet(index).is_dir()

    def sample_grid(self, index: int, step: int) -> Path:
        return (
            self.root / "samples" / f"{index + 1:02d}-{self.stage_names[index]}-step{step:07d}.png"
        )

    def write_recipe(self, recipe: Recipe) -> None:
        text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        write_text_atomic(self.root / "recipe.yaml", text)

    def save_stage_student(self, index: int, student: UNet2DConditionModel) -> None:
        with atomic_folder(self.stage_unet(index)) as folder:
            student.save_pretrained(folder, safe_serialization=True)

    def save_student_pipeline(self, components, index: int, dtype: torch.dtype) -> Path:
        """Stage `index`'s student, in `dtype`, inside `components`' pipeline (VAE, text
        encoder, ...)."""
        unet = UNet2DConditionModel.from_pretrained(self.stage_unet(index), dtype=dtype)
        with atomic_folder(self.student_pipeline) as folder:
            components.with_unet(unet).save_pretrained(folder, safe_serialization=True)
        return self.student_pipeline
