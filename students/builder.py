"""Build a compact student UNet from a teacher, initialized from the teacher's own layers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from core.families import unet_from_config
from students.init_map import block_pairs, init_map
from students.variants import StudentVariant, get_variant, student_config


@dataclass
class InitReport:
    """Where every student tensor came from: copied from a named teacher tensor, or fresh."""

    variant: str
    copied: dict[str, str] = field(default_factory=dict)  # student key -> teacher key
    fresh: dict[str, str] = field(default_factory=dict)  # student key -> why it is fresh
    unused_teacher: list[str] = field(default_factory=list)  # teacher keys nobody copied
    block_pairs: list[tuple[str, str]] = field(default_factory=list)  # (student, teacher) paths

    def summary(self) -> str:
        lines = [
            f"init: {len(self.copied)} tensors copied from the teacher, {len(self.fresh)} fresh, "
            f"{len(self.unused_teacher)} teacher tensors unused"
        ]
        lines += [f"  fresh {key}: {why}" for key, why in self.fresh.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "copied": self.copied,
            "fresh": self.fresh,
            "unused_teacher": self.unused_teacher,
            "block_pairs": [list(pair) for pair in self.block_pairs],
        }


def build_student(
    teacher: UNet2DConditionModel | Mapping[str, Any],
    variant: str | StudentVariant = "base",
) -> tuple[UNet2DConditionModel, InitReport]:
    """The student UNet for `variant`, with every tensor the teacher can supply copied from it.

    `teacher` is a UNet (its weights are copied; the student lands on the teacher's device and
    dtype, the meta device included) or a UNet config (the student is built on the meta device and
    the report says what a real teacher would supply). Each student tensor is either copied from a
    teacher tensor of identical shape or listed in `report.fresh` with the reason; nothing is copied
    partially.
    """
    variant = get_variant(variant)
    if isinstance(teacher, UNet2DConditionModel):
        teacher_config = dict(teacher.config)
        teacher_state = teacher.state_dict()
        device, dtype = teacher.device, teacher.dtype
    else:
        teacher_config = dict(teacher)
        teacher_state = unet_from_config(teacher_config, device="meta").state_dict()
        device, dtype = torch.device("meta"), torch.float32

    config = student_config(teacher_config, variant)
    student = unet_from_config(config, device=device)
    if dtype != student.dtype:
        student = student.to(dtype)
    report = InitReport(variant=variant.name, block_pairs=block_pairs(config, teacher_config))

    student_state = student.state_dict()
    sources = init_map(student_state, config, teacher_config)
    with torch.no_grad():
        for key, target in student_state.items():
            source_key = sources[key]
            source = teacher_state.get(source_key)
            if source is None:
                report.fresh[key] = f"no teacher tensor {source_key}"
            elif source.shape != target.shape:
                report.fresh[key] = (
                    f"shape {tuple(target.shape)} != teacher {source_key} {tuple(source.shape)}"
                )
            else:
                target.copy_(source)
                report.copied[key] = source_key
    used = set(report.copied.values())
    report.unused_teacher = [key for key in teacher_state if key not in used]
    return student, report
