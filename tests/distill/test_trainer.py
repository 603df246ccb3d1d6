"""The distillation engine end to end on a tiny SD world: stages, hand-off, logs, resume, NaNs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from distill.checkpoint import TrainingState, list_checkpoints
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer, TrainingStopped
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {
        "a": make_tiny_pipeline(root / "a", seed=1),
        "b": make_tiny_pipeline(root / "b", seed=2),
    }


def _train(raw: dict, **kwargs) -> DistillationTrainer:
    trainer = DistillationTrainer(validate_recipe(raw), progress=False, **kwargs)
    trainer.train()
    return trainer


def _stage_weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "stages" / stage / "unet" / "diffusion_pytorch_model.safetensors")


def test_three_stages_hand_off_and_log_every_term(teachers, tmp_path: Path) -> None:
    raw = tiny_recipe(
        tmp_path, teachers, validation_prompts=["a photo of a bag"], validation_steps=2
    )
    trainer = _train(raw)
    run_dir = trainer.run_dir

    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").open()]
    terms_by_stage = {}
    for record in records:
        terms_by_stage.setdefault(record["stage"], set()).update(
            k for k in record if k.startswith("loss/")
        )
    assert terms_by_stage["denoise"] == {"loss/task", "loss/total"}
    assert terms_by_stage["soft_labels"] == {"loss/task", "loss/output_kd", "loss/total"}
    assert terms_by_stage["layer_matching"] == {
        "loss/task",
        "loss/output_kd",
        "loss/similarity",
        "loss/total",
    }
    for stage in ("01-denoise", "02-soft_labels", "03-layer_matching"):
        assert (run_dir / "stages" / stage / "unet" / "config.json").is_file()
    assert any((run_dir / "logs").rglob("events.out.tfevents.*"))  # tensorboard
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "init_report.json").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir())[-1].startswith("03-layer")
    # keep_last=2 really deletes older checkpoints
    assert len(list_checkpoints(run_dir / "checkpoints")) == 2

    pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "student_pipeline")
    assert pipeline.unet.config.layers_per_block == 1
    image = pipeline("a bag", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_stage_starts_from_previous_stages_ema_student(teachers, tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, teachers)
    raw["stages"] = raw["stages"][:2]
    raw["stages"][1]["steps"] = 1
    raw["stages"][1]["lr"] = 1e-12  # one near-zero step: stage 2's result ~= its start
    raw["training"]["ema"] = {"enabled": True, "decay": 0.999999}
    trainer = _train(raw)
    first = _stage_weights(trainer.run_dir, "01-denoise")
    second = _stage_weights(trainer.run_dir, "02-soft_labels")
    for key, tensor in first.items():
        torch.testing.assert_close(second[key], tensor, rtol=0, atol=1e-6)


def test_interrupted_and_resumed_run_ends_bitwise_equal(teachers, tmp_path: Path) -> None:
    whole = tiny_recipe(tmp_path / "whole", teachers)
    _train(whole)
    parts = tiny_recipe(tmp_path / "parts", teachers)
    # Interrupt mid-stage 2 (after 3 + 2 steps; checkpoint at its step 2), then mid-stage 3
    # (3 steps later: just after its step-2 checkpoint), then finish.
    checkpoints = Path(parts["output_dir"]) / "checkpoints"
    _train(parts, stop_after_steps=5)
    assert list_checkpoints(checkpoints)[-1].state == TrainingState(1, "soft_labels", 2)
    _train(parts, stop_after_steps=3)
    assert list_checkpoints(checkpoints)[-1].state == TrainingState(2, "layer_matching", 2)
    _train(parts)
    for stage in ("01-denoise", "02-soft_labels", "03-layer_matching"):
        expected = _stage_weights(Path(whole["output_dir"]), stage)
        actual = _stage_weights(Path(parts["output_dir"]), stage)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (stage, key)


def test_nonfinite_loss_skips_steps_then_stops_keeping_the_checkpoint(
    teachers, tmp_path: Path
) -> None:
    broken = make_tiny_pipeline(tmp_path / "broken", seed=3)
    unet = UNet2DConditionModel.from_pretrained(broken / "unet")
    with torch.no_grad():
        unet.conv_out.weight.fill_(float("nan"))  # every teacher prediction is NaN
    unet.save_pretrained(broken / "unet")
    raw = tiny_recipe(tmp_path, {"a": teachers["a"], "b": broken}, max_consecutive_nonfinite=2)
    raw["stages"][2]["steps"] = 5
    with pytest.raises(TrainingStopped, match="NaN/Inf for 2 steps"):
        _train(raw)
    run_dir = Path(raw["output_dir"])
    latest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert (latest.state.stage_index, latest.state.step) == (1, 3)  # stage 2's end, intact
    student = latest.load_student()
    assert all(torch.isfinite(t).all() for t in student.values())
