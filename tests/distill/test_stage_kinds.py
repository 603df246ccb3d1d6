"""Stage kinds: a kind written outside the package is one class and one registry line, trains on
the engine's loop with its own checkpointed state, and resumes bitwise; bad kinds and options are
one line naming the key."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from cli import main
from distill.checkpoint import list_checkpoints
from distill.kinds import STAGE_KINDS, KindOptions, LatentStageKind, register_stage_kind
from distill.recipe import validate_recipe
from distill.taps import unwrap_model
from distill.trainer import DistillationTrainer
from testkit.tiny_world import tiny_recipe


class MeanTeacherKind(LatentStageKind):
    """A kind of its own: the student against the target and against a slow EMA copy of itself
    (a "mean teacher"), which the kind owns, updates after every applied step and checkpoints."""

    name: ClassVar[str] = "mean_teacher"

    class Options(KindOptions):
        decay: float = 0.5
        consistency_weight: float = 1.0

    def start(self, model: torch.nn.Module) -> None:
        self.target = copy.deepcopy(unwrap_model(model)).requires_grad_(False).eval()

    def loss_step(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        noisy = self.noisy(batch)
        prediction = model(noisy.noisy, noisy.timesteps, **noisy.conditioning).sample
        with torch.no_grad():
            slow = self.target(noisy.noisy, noisy.timesteps, **noisy.conditioning).sample
        terms = {
            "task": F.mse_loss(prediction, noisy.target),
            "mean_teacher": F.mse_loss(prediction, slow),
        }
        return terms["task"] + self.setup.options.consistency_weight * terms["mean_teacher"], terms

    @torch.no_grad()
    def after_update(self, model) -> None:
        decay = self.setup.options.decay
        for slow, fast in zip(
            self.target.parameters(), unwrap_model(model).parameters(), strict=True
        ):
            slow.lerp_(fast, 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.target.load_state_dict({k.removeprefix("target."): v for k, v in state.items()})


@pytest.fixture
def mean_teacher_kind():
    register_stage_kind(MeanTeacherKind)  # the one registry line
    yield MeanTeacherKind
    del STAGE_KINDS[MeanTeacherKind.name]


def _recipe(tmp_path: Path, teachers: dict[str, Path], steps: int = 4) -> dict:
    raw = tiny_recipe(tmp_path, teachers)
    raw["stages"] = [
        {"name": "denoise", "steps": 2, "batch_size": 4, "lr": 1e-3},
        {
            "name": "mean_teacher",
            "kind": "mean_teacher",
            "steps": steps,
            "batch_size": 4,
            "lr": 1e-3,
            "options": {"decay": 0.5},
        },
    ]
    return raw


def _train(raw: dict, **kwargs) -> DistillationTrainer:
    trainer = DistillationTrainer(validate_recipe(raw), progress=False, **kwargs)
    trainer.train()
    return trainer


def test_a_kind_defined_here_trains_checkpoints_its_state_and_resumes_bitwise(
    mean_teacher_kind, teachers, tmp_path: Path
) -> None:
    whole = _recipe(tmp_path / "whole", teachers)
    run = _train(whole).run_dir
    records = [yaml.safe_load(line) for line in (run / "logs" / "metrics.jsonl").open()]
    kind_records = [r for r in records if r["stage"] == "mean_teacher"]
    assert len(kind_records) == 4 and all(r["loss/mean_teacher"] >= 0 for r in kind_records)
    assert kind_records[0]["loss/mean_teacher"] == 0  # the target starts as the student
    assert kind_records[1]["loss/mean_teacher"] > 0  # ...and lags it after one update
    final = list_checkpoints(run / "checkpoints")[-1]
    target = final.load_kind_state()
    assert target and all(key.startswith("target.") for key in target)

    parts = _recipe(tmp_path / "parts", teachers)
    _train(parts, stop_after_steps=2 + 3)  # stage 2 interrupted after step 3 (checkpoint at 2)
    assert list_checkpoints(Path(parts["output_dir"]) / "checkpoints")[-1].state.step == 2
    resumed = _train(parts).run_dir
    unet = "stages/02-mean_teacher/unet/diffusion_pytorch_model.safetensors"
    expected, actual = load_file(run / unet), load_file(resumed / unet)
    assert all(torch.equal(actual[key], value) for key, value in expected.items())
    resumed_target = list_checkpoints(resumed / "checkpoints")[-1].load_kind_state()
    assert all(torch.equal(resumed_target[key], value) for key, value in target.items())


def _run_cli(raw: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# test\n" + yaml.safe_dump(raw))
    code = main(["run", str(recipe), "--no-progress"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"kind": "mean_teachr"}, "stages.1.kind: unknown stage kind 'mean_teachr'; known: "),
        ({"options": {"decay": 0.5, "foo": 1}}, "stages.1.options.foo: Extra inputs are not"),
        ({"options": {"decay": "slow"}}, "stages.1.options.decay: Input should be a valid"),
        ({"losses": {"task": {}}}, "losses: stage kind 'mean_teacher' takes no loss blocks"),
        ({"teacher": "a"}, "teacher: stage kind 'mean_teacher' trains without a teacher"),
    ],
)
def test_a_bad_kind_or_option_is_one_line_naming_the_key_and_writes_nothing(
    mean_teacher_kind, teachers, tmp_path: Path, capsys, edit: dict, message: str
) -> None:
    raw = _recipe(tmp_path, teachers)
    raw["stages"][1] |= edit
    code, error = _run_cli(raw, tmp_path, capsys)
    assert code == 2 and len(error.splitlines()) == 1, error
    assert message in error
    assert not Path(raw["output_dir"]).exists() and not (tmp_path / "cache").exists()
