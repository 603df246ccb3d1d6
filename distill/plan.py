"""The run plan: everything setup decides once, before any weight is loaded.

`plan_run(recipe)` resolves and fingerprints every teacher once, derives the student's UNet config
from the init teacher's, builds every stage's losses for the two configs, and checks each
stage's layer pairs on meta-device models (`distill.preflight`). The stage builder, the trainer
and the resume checks read this plan; nothing resolves a teacher or builds a loss twice.

A problem is one line naming the recipe key, raised before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import UserInputError
from core.families import ModelSource, resolve
from distill.kinds import KindOptions, StageKind, stage_kind
from distill.losses import Loss, build_losses
from distill.preflight import check_loss_shapes
from distill.provenance import teacher_fingerprint
from distill.recipe import EMASpec, Recipe, StageSpec
from students import StudentVariant, student_config


@dataclass(frozen=True)
class TeacherPlan:
    """A recipe teacher, resolved once: where it is, its family and UNet config, and the
    fingerprint of its files (None: a hub model not in the local cache)."""

    key: str
    reference: str
    source: ModelSource
    fingerprint: str | None

    @property
    def unet_config(self) -> dict[str, Any]:
        return self.source.unet_config


@dataclass(frozen=True)
class StagePlan:
    """One stage as it will run: its settings, kind, teacher, pipeline source and built losses."""

    index: int
    spec: StageSpec
    kind: type[StageKind]
    teacher: TeacherPlan | None
    source: TeacherPlan  # whose pipeline (VAE, text encoders, scheduler) the stage uses
    losses: tuple[Loss, ...]
    ema: EMASpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def options(self) -> KindOptions:
        return self.spec.options


@dataclass(frozen=True)
class RunPlan:
    recipe: Recipe
    teachers: Mapping[str, TeacherPlan]
    init: TeacherPlan
    variant: StudentVariant
    student_config: dict[str, Any]  # the student UNet's config, from the init teacher's
    stages: tuple[StagePlan, ...]

    @property
    def components(self) -> list[str]:
        """The pipeline part each stage trains, in stage order."""
        return [stage.kind.component for stage in self.stages]


def plan_run(recipe: Recipe) -> RunPlan:
    """The plan of `recipe` (its paths already resolved, `distill.recipe.resolve_paths`)."""
    teachers = {
        key: TeacherPlan(key, reference, resolve(reference), teacher_fingerprint(reference))
        for key, reference in recipe.teachers.items()
    }
    init = teachers[recipe.student.init_from]
    variant = recipe.student.shape()
    student = student_config(init.unet_config, variant)
    stages = tuple(
        _plan_stage(index, spec, teachers, init, student, recipe)
        for index, spec in enumerate(recipe.stages)
    )
    return RunPlan(recipe, teachers, init, variant, student, stages)


def _plan_stage(
    index: int,
    spec: StageSpec,
    teachers: Mapping[str, TeacherPlan],
    init: TeacherPlan,
    student: dict[str, Any],
    recipe: Recipe,
) -> StagePlan:
    teacher = teachers[spec.teacher] if spec.teacher is not None else None
    if teacher is not None and teacher.source.family.name != init.source.family.name:
        raise UserInputError(
            f"stages.{index}.teacher: {spec.teacher!r} is an {teacher.source.family.name} "
            f"teacher, but the student is built from {recipe.student.init_from!r}, an "
            f"{init.source.family.name} teacher: a stage teacher must be of the student's family"
        )
    try:
        losses = build_losses(
            spec.loss_blocks, student, teacher.unet_config if teacher is not None else None
        )
        if teacher is not None:
            check_loss_shapes(losses, student, teacher.unet_config)
    except UserInputError as error:
        raise UserInputError(f"stages.{index}.{error}") from None
    return StagePlan(
        index=index,
        spec=spec,
        kind=stage_kind(spec.kind),
        teacher=teacher,
        source=teacher or init,
        losses=tuple(losses),
        ema=spec.ema or recipe.training.ema,
    )
