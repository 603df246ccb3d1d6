"""The shipped offline recipes, run end to end on a few steps and tiny models."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from cli import main
from testkit.tiny_world import TOY_TEACHER_OVERRIDES, make_tiny_pipeline

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_fashion_small_sd_recipe_runs_its_three_stages(tmp_path: Path) -> None:
    a, b = make_tiny_pipeline(tmp_path / "a", 1), make_tiny_pipeline(tmp_path / "b", 2)
    overrides = [
        f"teachers.a={a}",
        f"teachers.b={b}",
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_samples=16",
        "training.validation_steps=2",
        *(f"stages.{i}.{key}" for i in range(3) for key in ("steps=2", "batch_size=4")),
    ]
    assert main(["run", str(RECIPES / "fashion_small_sd.yaml"), *overrides, "--no-progress"]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "stages").iterdir()) == [
        "01-denoise",
        "02-soft_labels",
        "03-layer_matching",
    ]
    assert len(list((run / "samples").glob("*.png"))) == 3
    pipeline = StableDiffusionPipeline.from_pretrained(run / "student_pipeline")
    assert pipeline.unet.config.layers_per_block == 1


def test_fashion_teacher_recipe_trains_then_reuses_its_teachers(tmp_path: Path, capsys) -> None:
    recipe = str(RECIPES / "fashion_teacher.yaml")
    overrides = [f"output_dir={tmp_path / 'teachers'}", *TOY_TEACHER_OVERRIDES]
    assert main(["run", recipe, *overrides, "--no-progress"]) == 0
    for name in ("a", "b"):
        pipeline = StableDiffusionPipeline.from_pretrained(
            tmp_path / "teachers" / f"teacher_{name}"
        )
        assert pipeline.unet.config.layers_per_block == 2
    capsys.readouterr()
    assert main(["run", recipe, *overrides, "--no-progress"]) == 0
    assert "reusing the teachers" in capsys.readouterr().out


def test_fashion_teacher_recipe_names_a_bad_training_key(tmp_path: Path, capsys) -> None:
    recipe = str(RECIPES / "fashion_teacher.yaml")
    code = main(["run", recipe, f"output_dir={tmp_path / 't'}", "train.vae_stepz=3"])
    assert code == 2
    assert "train.vae_stepz: Extra inputs are not permitted" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
