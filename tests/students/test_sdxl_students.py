"""SDXL students: KOALA's builtin shapes, the transformer-depth knob, KOALA's layer-pair preset."""

from __future__ import annotations

import json

import pytest
import torch

from cli import main
from core.errors import UserInputError
from core.families import resolve
from offline.tiny_models import tiny_sdxl_unet
from students import (
    StudentVariant,
    build_student,
    count_params,
    deepest_self_attention_pairs,
    transformer_depths,
)

# Published UNet sizes (Lee et al. 2023, arXiv 2312.04005, Table 1 / the model cards):
# KOALA-1B 1.16B, KOALA-700M 782M parameters.
PUBLISHED = {"koala-1b": 1.16e9, "koala-700m": 782e6}
RECORDED = {"koala-1b": 1_161_184_324, "koala-700m": 782_822_724}


@pytest.fixture(scope="module")
def sdxl():
    return resolve("sdxl-base").meta_unet()


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_koala_variants_match_the_published_parameter_counts(sdxl, variant: str) -> None:
    student, report = build_student(sdxl, variant)
    params = count_params(student)
    assert abs(params - PUBLISHED[variant]) / PUBLISHED[variant] < 0.01
    assert params == RECORDED[variant]
    assert report.fresh == {}  # every tensor comes from SDXL's own layers


def test_koala_700m_keeps_five_transformer_layers_at_the_deepest_stage(sdxl) -> None:
    student, _ = build_student(sdxl, "koala-700m")
    assert transformer_depths(sdxl) == {
        "down_blocks": [0, 2, 10],
        "mid_block": 10,
        "up_blocks": [10, 2, 0],
    }
    assert transformer_depths(student) == {
        "down_blocks": [0, 2, 5],
        "mid_block": None,
        "up_blocks": [5, 2, 0],
    }


def test_a_koala_variant_on_an_sd_v1_teacher_is_one_line() -> None:
    with pytest.raises(UserInputError, match="defined for sdxl teachers; this is an sd teacher"):
        build_student(resolve("sd-v1-4").meta_unet(), "koala-1b")


def test_a_cut_transformer_keeps_the_teachers_first_layers() -> None:
    torch.manual_seed(0)
    teacher = tiny_sdxl_unet(transformer_layers=(1, 2, 3)).eval()
    shape = StudentVariant("cut", "test", transformer_depth=(1, 1, 2))
    student, report = build_student(teacher, shape)
    assert transformer_depths(student)["down_blocks"] == [0, 1, 2]
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for layer in (0, 1):
        key = f"down_blocks.2.attentions.0.transformer_blocks.{layer}.attn1.to_q.weight"
        assert report.copied[key] == key
        torch.testing.assert_close(student_state[key], teacher_state[key], rtol=0, atol=0)
    assert not any(
        ".transformer_blocks.2." in key for key in student_state if "down_blocks.2" in key
    )
    with pytest.raises(UserInputError, match=r"keeps \[1, 3, 2\] transformer layers"):
        build_student(teacher, StudentVariant("x", "x", transformer_depth=(1, 3, 2)))


@pytest.mark.parametrize(("variant", "pairs"), [("koala-1b", 24), ("koala-700m", 15)])
def test_koala_preset_pairs_the_deepest_self_attentions_by_depth(sdxl, variant, pairs) -> None:
    student, _ = build_student(sdxl, variant)
    found = deepest_self_attention_pairs(student.config, sdxl.config)
    assert len(found) == pairs  # (down 1 + mid 1 + up 2 attentions) x depth; 700M has no mid
    for student_path, teacher_path in found:
        assert student_path.endswith(".attn1") and teacher_path.endswith(".attn1")
        assert student_path.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0."))
        # the same transformer layer index on both sides: depth k against depth k
        assert (
            student_path.split("transformer_blocks.")[1]
            == teacher_path.split("transformer_blocks.")[1]
        )


def test_cli_json_lists_the_transformer_depth_of_every_block(capsys) -> None:
    assert main(["student", "--teacher", "sdxl-base", "--variant", "koala-1b", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["family"] == "sdxl"
    assert figures["student_params"] == RECORDED["koala-1b"]
    assert figures["student_transformer_depth"] == {
        "down_blocks": [0, 2, 6],
        "mid_block": 6,
        "up_blocks": [6, 2, 0],
    }
