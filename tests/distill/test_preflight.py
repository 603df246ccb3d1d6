"""Bad layer pairs are found before any step: on meta-device models, one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli import main
from core.errors import UserInputError
from distill.losses import build_losses, validate_loss_blocks
from distill.preflight import check_loss_shapes
from students import build_student
from testkit.tiny_world import tiny_recipe
from testkit.unets import make_tiny_sd_v1_4


@pytest.fixture(scope="module")
def configs():
    teacher = make_tiny_sd_v1_4()
    student, _ = build_student(teacher, "base")
    return student.config, teacher.config


def _check(configs, blocks: dict) -> None:
    student, teacher = configs
    check_loss_shapes(
        build_losses(validate_loss_blocks(blocks), student, teacher), student, teacher
    )


def test_default_pairs_of_every_feature_loss_pass(configs) -> None:
    _check(configs, {"feature_kd": {}, "similarity": {}, "attention_relation": {}})


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"feature_kd": {"layer_pairs": [["down_blocks.0", "down_blocks.0"], ["mid", "mid"]]}},
            r"^losses\.feature_kd\.layer_pairs\.1: student unknown module path 'mid'",
        ),
        (
            {"feature_kd": {"layer_pairs": [["down_blocks.0", "down_blocks.1"]]}},
            r"^losses\.feature_kd\.layer_pairs\.0: .*differ.*\(1, 32, 4, 4\).*\(1, 32, 2, 2\)",
        ),
        (
            {"similarity": {"layer_pairs": [["down_blocks.0", "up_blocks.0"]]}},
            r"^losses\.similarity\.layer_pairs\.0: .*same batch and spatial size",
        ),
        (
            {
                "attention_relation": {
                    "layer_pairs": [["down_blocks.0", "down_blocks.0"]],
                    "relation_heads": 4,
                }
            },
            r"^losses\.attention_relation\.layer_pairs\.0: .*\(B, N, C\) attention projections",
        ),
    ],
)
def test_a_bad_pair_is_named_with_its_key_and_shapes(configs, block, message) -> None:
    with pytest.raises(UserInputError, match=message):
        _check(configs, block)


@pytest.mark.parametrize(
    ("losses", "key"),
    [
        ({"feature_kd": {"layer_pairs": [["down_blocks.9", "down_blocks.0"]]}}, "down_blocks.9"),
        ({"feature_kd": {"layer_pairs": [["down_blocks.0", "up_blocks.0"]]}}, "shapes differ"),
    ],
)
def test_distill_run_refuses_a_bad_pair_in_a_later_stage_before_writing_anything(
    teachers, tmp_path: Path, capsys, losses, key
) -> None:
    raw = tiny_recipe(tmp_path, teachers)
    raw["stages"][2]["losses"] = losses
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# test\n" + yaml.safe_dump(raw))
    assert main(["run", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("distill run: error: stages.2.losses.feature_kd.layer_pairs.0: ")
    assert key in error
    assert not Path(raw["output_dir"]).exists()
    assert not (tmp_path / "cache").exists()  # not even the data cache was built
