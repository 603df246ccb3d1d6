"""The step guard: a NaN gradient behind a finite loss changes nothing, and is counted.

bf16 has no GradScaler, so only the guard stands between a NaN gradient and the weights; under
fp16 the GradScaler decides and its state must survive a checkpoint. accelerate 1.15 creates no
GradScaler on CPU, so the fp16 cases install torch's CPU GradScaler the way accelerate installs
its CUDA one (before `prepare`), which exercises the same code paths as fp16 on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from distill.checkpoint import (
    NonFiniteWeights,
    TrainingState,
    list_checkpoints,
    save_training_checkpoint,
)
from distill.losses import LOSSES, Loss, StepOutputs
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from distill.update import guarded_update
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe


def _accelerator(precision: str, growth_interval: int = 2000) -> Accelerator:
    # AcceleratorState is a process-wide singleton that refuses a second mixed precision
    # (accelerate 1.15); reset it, as accelerate's own tests do, on entry and on exit.
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision=precision, cpu=True)
    if precision == "fp16":
        accelerator.scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
        accelerator.native_amp = True  # as on CUDA: clip_grad_norm_ unscales, autocast is fp16
    return accelerator


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def _poison_one_gradient(model: torch.nn.Module) -> torch.Tensor:
    """A finite loss whose gradient is NaN in one weight: d√x/dx at 0 is inf, times 0."""
    output = model(torch.ones(2, 4))
    return output.pow(2).mean() + torch.sqrt(model.weight[0, 0] * 0.0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_nan_gradient_with_a_finite_loss_leaves_weights_and_optimizer_untouched(precision):
    accelerator = _accelerator(precision)
    torch.manual_seed(0)
    model, optimizer = torch.nn.Linear(4, 4), None
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    accelerator.backward(model(torch.ones(2, 4)).pow(2).mean())  # one good step: Adam has state
    assert guarded_update(accelerator, model, optimizer, 1.0)[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    loss = _poison_one_gradient(model)
    assert torch.isfinite(loss)
    accelerator.backward(loss)
    applied, norm = guarded_update(accelerator, model, optimizer, 1.0)

    assert not applied and not torch.isfinite(torch.tensor(norm))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert all(p.grad is None for p in model.parameters())


class PoisonedGradientLoss(Loss):
    """The task MSE, plus a term that is 0 in value and NaN in gradient on the 2nd call."""

    name: ClassVar[str] = "poisoned_task"
    reads_teacher: ClassVar[bool] = False
    calls: ClassVar[int] = 0

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        type(self).calls += 1
        term = (outputs.student_pred - outputs.target).pow(2).mean()
        if type(self).calls == 2:
            term = term + torch.sqrt(outputs.student_pred.flatten()[0] * 0.0)
        return {self.name: term}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_skipped_step_moves_nothing_then_training_goes_on(precision, tmp_path, monkeypatch):
    monkeypatch.setitem(LOSSES, PoisonedGradientLoss.name, PoisonedGradientLoss)
    monkeypatch.setattr(PoisonedGradientLoss, "calls", 0)
    teachers = {"a": make_tiny_pipeline(tmp_path / "a", 1)}
    raw = tiny_recipe(
        tmp_path, teachers, checkpoint_every=1, keep_last=9, mixed_precision=precision
    )
    raw["training"]["ema"] = {"enabled": True, "decay": 0.5}
    raw["stages"] = [
        {"name": "s", "steps": 4, "batch_size": 2, "lr": 1e-2, "losses": {"poisoned_task": {}}}
    ]
    accelerator = _accelerator(precision)
    DistillationTrainer(validate_recipe(raw), accelerator=accelerator, progress=False).train()

    checkpoints = {
        c.state.step: c for c in list_checkpoints(Path(raw["output_dir"]) / "checkpoints")
    }
    before, skipped, after = checkpoints[1], checkpoints[2], checkpoints[3]
    for load in ("load_student", "load_ema"):
        first, second, third = (getattr(c, load)() for c in (before, skipped, after))
        assert all(torch.equal(first[k], second[k]) for k in first), load
        assert any(not torch.equal(second[k], third[k]) for k in second), load
    state_before, state_skipped = before.load_optimizer(), skipped.load_optimizer()
    assert state_skipped["lr_scheduler"]["last_epoch"] == state_before["lr_scheduler"]["last_epoch"]
    assert state_skipped["ema"]["optimization_step"] == state_before["ema"]["optimization_step"]
    adam = lambda state: state["optimizer"]["state"][0]["exp_avg"]  # noqa: E731
    assert torch.equal(adam(state_skipped), adam(state_before))
    if precision == "fp16":  # the scaler saw the NaN and halved its scale, in the checkpoint too
        assert state_skipped["scaler"]["scale"] == state_before["scaler"]["scale"] / 2
    log = Path(raw["output_dir"]) / "logs" / "metrics.jsonl"
    skipped_counts = [json.loads(line)["nonfinite_skipped"] for line in log.open()]
    assert skipped_counts == [0, 1, 1, 1]


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    kwargs = dict(
        accelerator=_accelerator("no"), student=model, optimizer=optimizer, lr_scheduler=schedule
    )
    kwargs["ema"] = None
    save_training_checkpoint(tmp_path, TrainingState(0, "s", 1), **kwargs)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(NonFiniteWeights, match="student tensor bias is not finite"):
        save_training_checkpoint(tmp_path, TrainingState(0, "s", 2), **kwargs)
    assert [c.state.step for c in list_checkpoints(tmp_path)] == [1]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no half-written temp
    assert torch.isfinite(
        load_file(tmp_path / "stage00-step0000001" / "student.safetensors")["bias"]
    ).all()


def test_an_fp16_run_resumed_with_its_grad_scaler_ends_bitwise_equal(tmp_path: Path) -> None:
    teachers = {"a": make_tiny_pipeline(tmp_path / "a", 1)}
    results = {}
    for name, interruptions in (("whole", []), ("parts", [2, 3])):
        raw = tiny_recipe(tmp_path / name, teachers, checkpoint_every=1, mixed_precision="fp16")
        raw["stages"] = [{"name": "s", "steps": 6, "batch_size": 2, "lr": 1e-2}]
        for stop in [*interruptions, None]:
            recipe = validate_recipe(raw)
            trainer = DistillationTrainer(
                recipe,
                accelerator=_accelerator("fp16", growth_interval=3),  # the scale grows twice
                progress=False,
                stop_after_steps=stop,
            )
            trainer.train()
        run = Path(raw["output_dir"])
        results[name] = (
            load_file(run / "stages" / "01-s" / "unet" / "diffusion_pytorch_model.safetensors"),
            list_checkpoints(run / "checkpoints")[-1].load_optimizer()["scaler"],
        )
    (whole, whole_scaler), (parts, parts_scaler) = results["whole"], results["parts"]
    assert all(torch.equal(whole[key], parts[key]) for key in whole)
    assert whole_scaler == parts_scaler
    assert whole_scaler["scale"] == 65536.0 * 4  # it grew twice: its state really moved
