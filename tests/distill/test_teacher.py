"""The frozen teacher's invariants, each tested by name."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserInputError
from distill.teacher import FrozenTeacher, check_compatible
from students import build_student
from testkit.unets import make_tiny_teacher


@pytest.fixture
def teacher() -> FrozenTeacher:
    return FrozenTeacher(make_tiny_teacher())


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, requires_grad=True),
        torch.tensor([3, 700]),
        torch.randn(2, 7, 16),
    )


def test_teacher_stays_in_eval_mode_when_asked_to_train(teacher: FrozenTeacher) -> None:
    parent = torch.nn.ModuleDict({"teacher": teacher})
    parent.train()
    teacher.train(True)
    assert not teacher.training
    assert not any(module.training for module in teacher.modules())


def test_teacher_parameters_never_require_grad(teacher: FrozenTeacher) -> None:
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_forward_builds_no_graph(teacher: FrozenTeacher) -> None:
    sample, timesteps, text = _inputs()
    out = teacher(sample, timesteps, encoder_hidden_states=text)
    assert not out.requires_grad and out.grad_fn is None


def test_teacher_runs_in_the_mixed_precision_dtype() -> None:
    teacher = FrozenTeacher(make_tiny_teacher(), dtype=torch.bfloat16)
    sample, timesteps, text = _inputs()
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert teacher(sample.detach(), timesteps, encoder_hidden_states=text).dtype == torch.bfloat16


def test_teacher_that_reads_other_inputs_than_the_student_is_refused() -> None:
    student, _ = build_student(make_tiny_teacher(), "base")
    other = make_tiny_teacher(cross_attention_dim=32)
    with pytest.raises(UserInputError, match="cross_attention_dim is 32 in the teacher"):
        check_compatible(student, other, "b")
