"""The distillation engine end to end on a tiny SD world: stages, hand-off, logs, resume, NaNs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from distill.checkpoint import TrainingState, list_checkpoints
from distill.losses import LOSSES, Loss, LossOptions, StepOutputs
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer, TrainingStopped
from testkit.memory_maps import in_unlinked_file
from testkit.recorded_run import load_record, mismatches, recorded_values
from testkit.tiny_world import make_tiny_pipeline, recorded_recipe, tiny_recipe


def _train(raw: dict, **kwargs) -> DistillationTrainer:
    trainer = DistillationTrainer(validate_recipe(raw), progress=False, **kwargs)
    trainer.train()
    return trainer


def _stage_weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "stages" / stage / "unet" / "diffusion_pytorch_model.safetensors")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def finished_run(teachers, tmp_path_factory) -> Path:
    """The seeded four-stage run of `recorded_recipe`, trained once for the tests below."""
    raw = recorded_recipe(tmp_path_factory.mktemp("recorded"), teachers)
    return _train(raw).run_dir


def test_seeded_run_logs_the_recorded_terms(finished_run: Path) -> None:
    """Same seed, same values: every logged term, total, gradient norm and learning rate within
    `testkit.recorded_run`'s tolerance (float64: it holds on other CPUs; a real change to the
    noising, data order, a loss or the optimizer fails it, `test_recorded_run.py`)."""
    assert mismatches(load_record(), recorded_values(_records(finished_run))) == []


def test_every_stage_logs_each_of_its_loss_terms_and_their_weighted_total(finished_run) -> None:
    weights = {"task": 1.0, "output_kd": 1.0, "similarity": 1.0, "feature_kd": 0.5}
    terms_by_stage: dict[str, set[str]] = {}
    for record in _records(finished_run):
        logged = {k.removeprefix("loss/"): v for k, v in record.items() if k.startswith("loss/")}
        terms = {k: v for k, v in logged.items() if "/" not in k}
        terms_by_stage.setdefault(record["stage"], set()).update(terms)
        total = terms.pop("total")
        assert total == pytest.approx(sum(weights[k] * v for k, v in terms.items()), rel=1e-6)
        for name in ("similarity", "feature_kd"):  # each layer pair is logged, summing to its loss
            pairs = [v for k, v in logged.items() if k.startswith(f"{name}/")]
            assert bool(pairs) == (name in terms)
            if pairs:
                assert sum(pairs) == pytest.approx(terms[name], rel=1e-5)
    assert terms_by_stage == {
        "denoise": {"task", "total"},
        "soft_labels": {"task", "output_kd", "total"},
        "layer_matching": {"task", "output_kd", "similarity", "total"},
        "bk_sdm": {"task", "output_kd", "feature_kd", "total"},
    }
    records = _records(finished_run)
    assert (
        "loss/similarity/mid_block" in records[6] and "loss/feature_kd/up_blocks.2" in records[-1]
    )
    assert any((finished_run / "logs").rglob("events.out.tfevents.*"))  # tensorboard too


def test_each_stage_saves_its_student_and_a_sample_grid(finished_run: Path) -> None:
    for stage in ("01-denoise", "02-soft_labels", "03-layer_matching", "04-bk_sdm"):
        assert (finished_run / "stages" / stage / "unet" / "config.json").is_file()
    grids = sorted(p.name for p in (finished_run / "samples").iterdir())
    assert [name[:2] for name in grids] == ["01", "02", "03", "04"]
    assert (finished_run / "recipe.yaml").is_file() and (
        finished_run / "init_report.json"
    ).is_file()


def test_keep_last_deletes_older_checkpoints(finished_run: Path) -> None:
    assert len(list_checkpoints(finished_run / "checkpoints")) == 2  # keep_last=2


def test_final_pipeline_is_the_compact_student_and_generates(finished_run: Path) -> None:
    # A float64 run's folder, loaded in its dtype (diffusers would load the UNet as fp32 and
    # transformers the text encoder as stored).
    pipeline = StableDiffusionPipeline.from_pretrained(
        finished_run / "student_pipeline", dtype=torch.float64
    )
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


def test_a_latent_stage_holds_its_idle_vae_as_a_file_map(teachers, tmp_path: Path) -> None:
    """The steps read the latent cache, so the pipeline's VAE waits in an unlinked file map in
    the run folder (`core.file_backed`), not in the process's own memory."""
    raw = tiny_recipe(tmp_path, teachers)
    raw["stages"] = raw["stages"][:1]
    trainer = _train(raw, stop_after_steps=1)
    vae = trainer.stages.stage_pipeline(0).vae
    for name, tensor in vae.state_dict().items():
        assert in_unlinked_file(tensor, trainer.run_dir), name


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


def _one_stage(tmp_path: Path, teachers: dict, losses: dict, steps: int = 2) -> dict:
    raw = tiny_recipe(tmp_path, teachers)
    raw["stages"] = [
        {"name": "only", "teacher": "b", "steps": steps, "batch_size": 4, "lr": 1e-3}
        | {"losses": losses}
    ]
    return raw


class LowNoiseTaskLoss(Loss):
    """A loss written outside the package: the task MSE on the samples with t < max_timestep."""

    name: ClassVar[str] = "low_noise_task"
    reads_teacher: ClassVar[bool] = False

    class Options(LossOptions):
        max_timestep: int = 500

    def __init__(self, weight: float = 1.0, max_timestep: int = 500) -> None:
        super().__init__(weight)
        self.max_timestep = max_timestep

    def forward(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        keep = (outputs.timesteps < self.max_timestep).float().reshape(-1, 1, 1, 1)
        squared = (outputs.student_pred - outputs.target).pow(2) * keep
        return {self.name: squared.sum() / (keep.sum() * squared[0].numel()).clamp(min=1)}


def test_a_loss_defined_outside_the_package_trains_once_registered(
    teachers, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(LOSSES, LowNoiseTaskLoss.name, LowNoiseTaskLoss)
    raw = _one_stage(tmp_path, teachers, {"low_noise_task": {"max_timestep": 999}}, steps=1)
    trainer = _train(raw)
    (record,) = _records(trainer.run_dir)
    assert (
        record["loss/low_noise_task"] > 0 and record["loss/total"] == record["loss/low_noise_task"]
    )
    start = _stage_weights(trainer.run_dir, "01-only")  # EMA of one step, decay 0.9
    initial = load_file(
        Path(raw["teachers"]["a"]) / "unet" / "diffusion_pytorch_model.safetensors"
    )  # the student was initialized from teacher a
    assert not torch.equal(start["conv_in.weight"], initial["conv_in.weight"])


def test_feature_kd_on_blocks_and_attention_relation_on_projections_train_together(
    teachers, tmp_path: Path
) -> None:
    raw = _one_stage(
        tmp_path,
        teachers,
        {
            "task": {"weight": 1.0},
            "feature_kd": {"weight": 1.0},  # default pairs: every stage's output
            "attention_relation": {"weight": 0.5, "relation_heads": 4},  # default: projections
        },
    )
    records = _records(_train(raw).run_dir)
    assert len(records) == 2
    for record in records:
        assert record["loss/feature_kd"] > 0 and record["loss/attention_relation"] > 0
        expected = (
            record["loss/task"]
            + record["loss/feature_kd"]
            + 0.5 * record["loss/attention_relation"]
        )
        assert record["loss/total"] == pytest.approx(expected, rel=1e-6)


def test_output_kd_loss_falls_by_half_in_twenty_seeded_steps(teachers, tmp_path: Path) -> None:
    raw = _one_stage(tmp_path, teachers, {"output_kd": {"weight": 1.0}}, steps=20)
    raw["stages"][0] |= {"batch_size": 8, "lr": 3e-3}
    losses = [record["loss/output_kd"] for record in _records(_train(raw).run_dir)]
    # Measured: 0.27 at step 1, about 0.085 by steps 16-20 (teacher b, student from teacher a).
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3


def test_the_stage_student_is_the_ema_of_the_raw_weights_by_diffusers_decay_schedule(
    teachers, tmp_path: Path
) -> None:
    """EMA after k updates: e_1 = w_1, e_k = d_k·e_(k−1) + (1 − d_k)·w_k with diffusers'
    d_k = min(decay, k / (k + 9)) (EMAModel.get_decay, no warmup); the raw w_k are read back
    from the per-step checkpoints. A decay of 0.5 keeps e_4 far from w_4."""
    raw = _one_stage(tmp_path, teachers, {"task": {"weight": 1.0}}, steps=4)
    raw["training"] |= {
        "checkpoint_every": 1,
        "keep_last": 10,
        "ema": {"enabled": True, "decay": 0.5},
    }
    run = _train(raw).run_dir
    raw_weights = {c.state.step: c.load_student() for c in list_checkpoints(run / "checkpoints")}
    expected = dict(raw_weights[1])
    for k in (2, 3, 4):
        decay = min(0.5, k / (k + 9))
        expected = {
            key: decay * e + (1 - decay) * raw_weights[k][key] for key, e in expected.items()
        }
    final = _stage_weights(run, "01-only")
    for key, value in final.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    moved = [key for key in final if not torch.allclose(final[key], raw_weights[4][key])]
    assert len(moved) > len(final) // 2  # the EMA is really not the raw weights


def test_reading_the_cache_in_loader_workers_changes_nothing(teachers, tmp_path: Path) -> None:
    weights = {}
    for workers in (0, 2):
        raw = _one_stage(tmp_path / f"w{workers}", teachers, {"task": {}, "output_kd": {}})
        raw["stages"][0]["gradient_accumulation"] = 2
        raw["training"]["data_workers"] = workers
        run = _train(raw).run_dir
        weights[workers] = _stage_weights(run, "01-only")
        records = _records(run)
        assert all(record["data_wait_s"] >= 0 for record in records)  # logged every step
    assert all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])
