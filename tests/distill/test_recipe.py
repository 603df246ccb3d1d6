"""Recipe validation: strict keys and types, one line naming the key, overrides, shipped recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from cli import main
from core.errors import UserInputError
from distill.plan import plan_run
from distill.recipe import (
    TrainingSpec,
    apply_override,
    load_recipe,
    resolve_paths,
    validate_recipe,
)
from distill.stage import make_optimizer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

VALID = {
    "name": "t",
    "output_dir": "runs/t",
    "teachers": {"a": "owner/model-a", "b": "owner/model-b"},
    "student": {"variant": "base", "init_from": "a"},
    "data": {"source": "fashion-mnist", "resolution": 32},
    "stages": [
        {"name": "denoise", "steps": 10, "batch_size": 4, "lr": 1e-3},
        {
            "name": "kd",
            "teacher": "b",
            "steps": 10,
            "batch_size": 4,
            "lr": 1e-3,
            "losses": {
                "task": {"weight": 1.0},
                "output_kd": {"weight": 1.0},
                "similarity": {"weight": 0.5, "max_positions": 64},
            },
        },
    ],
}


def _invalid(mutate) -> str:
    raw = copy.deepcopy(VALID)
    mutate(raw)
    with pytest.raises(UserInputError) as error:
        validate_recipe(raw, source="r.yaml")
    message = str(error.value)
    assert "\n" not in message
    return message


def test_valid_recipe_has_defaults_filled_in() -> None:
    recipe = validate_recipe(copy.deepcopy(VALID))
    assert recipe.training.ema.enabled
    assert {name: block.weight for name, block in recipe.stages[0].loss_blocks.items()} == {
        "task": 1.0
    }
    similarity = recipe.stages[1].losses["similarity"]
    assert similarity.layer_pairs is None and similarity.max_positions == 64
    assert recipe.stages[1].gradient_accumulation == 1


def test_a_stage_weight_decay_overrides_the_runs_in_its_optimizer() -> None:
    raw = copy.deepcopy(VALID)
    raw["training"] = {"weight_decay": 0.05}
    raw["stages"][1]["weight_decay"] = 0.0
    recipe = validate_recipe(raw)
    model = torch.nn.Linear(2, 2)
    decays = [
        make_optimizer(model, stage.lr, recipe.training, stage.weight_decay).param_groups[0][
            "weight_decay"
        ]
        for stage in recipe.stages
    ]
    assert decays == [0.05, 0.0]


def test_unknown_key_is_named_with_its_path() -> None:
    message = _invalid(lambda r: r.update(training={"lrr": 1}))
    assert message.startswith("r.yaml: training.lrr:")


def test_wrong_type_is_named_with_its_path() -> None:
    message = _invalid(lambda r: r["stages"][1].update(steps="many"))
    assert "stages.1.steps" in message and "integer" in message


def test_losses_that_read_a_teacher_need_one() -> None:
    message = _invalid(lambda r: r["stages"][0].update(losses={"output_kd": {"weight": 1.0}}))
    assert "read a teacher, but no teacher" in message


def test_unknown_loss_and_unknown_teacher_are_refused() -> None:
    assert "unknown loss 'magic'" in _invalid(
        lambda r: r["stages"][1]["losses"].update(magic={"weight": 1.0})
    )
    assert "'c' is not in teachers" in _invalid(lambda r: r["stages"][1].update(teacher="c"))


@pytest.mark.parametrize(
    ("block", "key", "complaint"),
    [
        ({"weight": 0.5, "max_position": 64}, "similarity.max_position", "Extra inputs"),
        ({"weight": "half"}, "similarity.weight", "valid number"),
        ({"layer_pairs": [["down_blocks.0"]]}, "similarity.layer_pairs.0.1", "Field required"),
    ],
)
def test_a_bad_loss_block_is_named_down_to_its_option(block, key, complaint) -> None:
    message = _invalid(lambda r: r["stages"][1]["losses"].update(similarity=block))
    assert message.startswith(f"r.yaml: stages.1.losses.{key}: ") and complaint in message


def test_one_loss_option_does_not_reach_another_loss() -> None:
    raw = copy.deepcopy(VALID)
    raw["stages"][1]["losses"]["attention_relation"] = {"weight": 0.5, "relation_heads": 4}
    losses = validate_recipe(raw).stages[1].losses
    assert losses["similarity"].max_positions == 64
    assert losses["attention_relation"].max_positions == 256  # its own default
    assert losses["attention_relation"].relation_heads == 4


def test_the_old_loss_weights_form_gives_one_line_with_the_new_form() -> None:
    def old_form(raw: dict) -> None:
        stage = raw["stages"][1]
        del stage["losses"]
        stage["loss_weights"] = {"task": 1.0, "similarity": 0.5}
        stage["similarity_max_positions"] = 64

    message = _invalid(old_form)
    assert message.startswith("r.yaml: stages.1: loss_weights, similarity_max_positions were")
    assert message.endswith(
        "write {losses: {task: {weight: 1.0}, similarity: {weight: 0.5, max_positions: 64}}}"
    )


def test_missing_teacher_path_is_named() -> None:
    raw = copy.deepcopy(VALID)
    raw["teachers"]["a"] = "runs/nowhere/teacher_a"
    with pytest.raises(UserInputError, match=r"teachers.a: 'runs/nowhere/teacher_a' does not"):
        resolve_paths(validate_recipe(raw), Path("."))


def test_overrides_are_typed_and_reach_list_items() -> None:
    raw = copy.deepcopy(VALID)
    apply_override(raw, "stages.1.lr=1e-4")
    apply_override(raw, "training.ema.enabled=false")
    recipe = validate_recipe(raw)
    assert recipe.stages[1].lr == 1e-4 and recipe.training.ema.enabled is False
    with pytest.raises(UserInputError, match="index 5 out of range"):
        apply_override(raw, "stages.5.lr=1")
    with pytest.raises(UserInputError, match="key.sub=value"):
        apply_override(raw, "stages")


@pytest.mark.parametrize(
    "path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES))
)
def test_shipped_recipes_validate(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#"), "each recipe starts with the command that runs it"
    if raw.get("kind", "distill") == "distill":
        load_recipe(path)


def test_a_recipe_starts_from_its_base_and_applies_its_own_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(VALID))
    child = tmp_path / "variants" / "child.yaml"
    child.parent.mkdir()
    child.write_text(
        yaml.safe_dump(
            {
                "base": "../base.yaml",
                "name": "child",
                "data": {"resolution": 64},  # a mapping merges: data.source stays
                "overrides": ["stages.1.losses.similarity.normalize=teacher"],
            }
        )
    )
    recipe = load_recipe(child, ["stages.0.steps=3"])  # the command line's come last
    assert recipe.name == "child" and recipe.output_dir == "runs/t"
    assert recipe.data.source == "fashion-mnist" and recipe.data.resolution == 64
    assert recipe.stages[1].losses["similarity"].normalize == "teacher"
    assert recipe.stages[0].steps == 3 and recipe.stages[1].steps == 10
    # A list replaces the base's whole: one stage left.
    child.write_text(yaml.safe_dump({"base": "../base.yaml", "stages": VALID["stages"][:1]}))
    assert len(load_recipe(child).stages) == 1


def test_a_base_that_includes_itself_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserInputError, match="includes itself") as error:
        load_recipe(tmp_path / "a.yaml")
    assert "\n" not in str(error.value)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(UserInputError, match="missing.yaml"):
        load_recipe(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", ["small_sd_v0.yaml", "bk_sdm_base.yaml"])
def test_sd_scale_recipes_losses_fit_the_real_sd_v1_shapes(name: str) -> None:
    """Every stage's loss blocks and layer pairs, checked on meta-device SD v1.4/v1.5 UNets
    (the builtin configs stand in for the hub teachers, which cannot be downloaded here)."""
    raw = yaml.safe_load((RECIPES / name).read_text())
    raw["teachers"] = {key: key for key in raw["teachers"]}  # sd-v1-4 / sd-v1-5: builtin names
    plan_run(validate_recipe(raw))
    raw["stages"][-1]["losses"]["feature_kd"] = {"layer_pairs": [["down_blocks.0", "mid_block"]]}
    with pytest.raises(
        UserInputError, match=r"layer_pairs\.0: .*\(1, 320, 32, 32\).*\(1, 1280, 8, 8\)"
    ):
        plan_run(validate_recipe(raw))


def test_koala_recipe_fits_sdxl_and_taps_the_deepest_self_attentions() -> None:
    """recipes/koala_700m.yaml on a meta-device SDXL base (the builtin config stands in for the
    hub teacher): its preset finds the 15 self-attention pairs, and the same recipe on an SD v1
    teacher is refused in one line before anything is built."""
    raw = yaml.safe_load((RECIPES / "koala_700m.yaml").read_text())
    raw["teachers"] = {"sdxl": "sdxl-base"}
    plan_run(validate_recipe(raw))
    raw["teachers"] = {"sdxl": "sd-v1-4"}
    with pytest.raises(UserInputError, match="defined for sdxl teachers"):
        plan_run(validate_recipe(raw))


def test_cli_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    raw = copy.deepcopy(VALID)
    raw["output_dir"] = str(tmp_path / "run")
    raw["stages"][0]["steps"] = -1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stages.0.steps" in err
    assert not (tmp_path / "run").exists()


def test_cli_unreadable_recipe_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("stages: [unclosed")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2


def test_overrides_may_come_after_an_option() -> None:
    from cli.main import parse

    before = parse(["run", "recipe.yaml", "a=1", "--overwrite", "b.c=2"])
    assert before.overwrite and before.overrides == ["a=1", "b.c=2"]
    after = parse(["cache", "recipe.yaml", "--no-progress", "data.source=x"])
    assert after.overrides == ["data.source=x"]
    with pytest.raises(SystemExit) as refused:  # not an override: refused as argparse would
        parse(["run", "recipe.yaml", "--overwrite", "stray"])
    assert refused.value.code == 2


def test_auto_mixed_precision_is_bf16_only_where_the_device_computes_it(monkeypatch) -> None:
    import distill.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    assert precision.resolve_mixed_precision("auto") == "bf16"
    assert precision.Precision.of("auto").compute == torch.bfloat16
    assert precision.resolve_mixed_precision("auto", "float64") == "no"  # a reference run
    assert precision.resolve_mixed_precision("fp16") == "fp16"  # an explicit choice stays
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: False)
    assert precision.resolve_mixed_precision("auto") == "no"
    assert precision.Precision.of("auto").compute == torch.float32
    reference = {"dtype": "float64"}
    assert TrainingSpec(**reference).mixed_precision == "auto"  # the default passes
    with pytest.raises(ValueError, match="float64"):
        TrainingSpec(**reference, mixed_precision="bf16")
