"""The run folder: where each of a run's files lives, and the writes that must be atomic.

RUN/recipe.yaml                 the resolved recipe (a rerun of another recipe is refused)
RUN/init_report.json            which teacher tensor initialized each student tensor
RUN/provenance.json             what each stage trained from (distill.provenance)
RUN/logs/                       metrics.jsonl and tensorboard events
RUN/checkpoints/                stageNN-stepNNNNNNN/ (distill.checkpoint)
RUN/stages/NN-name/unet/        each stage's final network (EMA weights), diffusers format, in
                                the folder of the pipeline part it trained (`unet`, `vae`, ...)
RUN/stages/NN-name/stepNNNNNNN/unet/   the same at a step of the stage's `save_at`
RUN/samples/                    validation grids, NN-name-stepNNNNNNN.png
RUN/student_pipeline/           the last stage's pipeline with every part the run trained
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from diffusers import DiffusionPipeline, ModelMixin

from core.atomic import atomic_folder, write_text_atomic
from distill.recipe import Recipe


class RunFolder:
    def __init__(
        self, root: str | Path, stage_names: Sequence[str], components: Sequence[str]
    ) -> None:
        """`components`: the pipeline part each stage trains ("unet", "vae", ...)."""
        self.root = Path(root)
        self.stage_names = list(stage_names)
        self.components = list(components)

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

    def stage_output(self, index: int) -> Path:
        """Stage `index`'s final network, in the folder named after the part it trains."""
        return self.stage_dir(index) / self.components[index]

    def stage_unet(self, index: int) -> Path:
        return self.stage_output(index)

    def snapshot(self, index: int, step: int) -> Path:
        return self.stage_dir(index) / f"step{step:07d}" / self.components[index]

    def stage_finished(self, index: int) -> bool:
        return self.stage_output(index).is_dir()

    def trained_parts(self, before: int) -> dict[str, Path]:
        """component -> the output of the latest finished stage before `before` that trained it."""
        parts: dict[str, Path] = {}
        for index in range(before):
            if self.stage_finished(index):
                parts[self.components[index]] = self.stage_output(index)
        return parts

    def sample_grid(self, index: int, step: int) -> Path:
        return (
            self.root / "samples" / f"{index + 1:02d}-{self.stage_names[index]}-step{step:07d}.png"
        )

    def write_recipe(self, recipe: Recipe) -> None:
        text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        write_text_atomic(self.root / "recipe.yaml", text)

    def save_model(self, folder: Path, model: ModelMixin) -> None:
        with atomic_folder(folder) as temporary:
            model.save_pretrained(temporary, safe_serialization=True)

    def save_student_pipeline(self, pipeline: DiffusionPipeline) -> Path:
        with atomic_folder(self.student_pipeline) as folder:
            pipeline.save_pretrained(folder, safe_serialization=True)
        return self.student_pipeline
