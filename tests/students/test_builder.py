"""The student builder: real SD shapes on the meta device, exact copies on a tiny real teacher."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from core.families import builtin_config, builtin_names, resolve
from students import build_student, count_params, forward_gflops
from testkit.unets import make_tiny_teacher

SD_V1_4_PARAMS = {
    "teacher": 859_520_964,
    "base": 579_384_964,
    "small": 482_346_884,
    "tiny": 323_384_964,
}


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_sd_v1_4_student_has_the_published_param_count(variant: str) -> None:
    teacher = resolve("sd-v1-4").meta_unet()
    student, report = build_student(teacher, variant)
    assert count_params(teacher) == SD_V1_4_PARAMS["teacher"]
    assert count_params(student) == SD_V1_4_PARAMS[variant]
    assert student.device.type == "meta"
    assert report.fresh == {}  # every SD v1.4 student tensor has a same-shape teacher source


def test_sd_v1_4_forward_gflops_match_the_flop_counter_figures() -> None:
    teacher = resolve("sd-v1-4").meta_unet()
    student, _ = build_student(teacher, "base")
    assert forward_gflops(teacher) == pytest.approx(803.3, abs=0.05)
    assert forward_gflops(student) == pytest.approx(523.0, abs=0.05)


@pytest.mark.parametrize("name", ["sd-v1-4", "sd-v1-5", "sd-v2-1-base", "sdxl-base"])
@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_every_builtin_teacher_and_variant_builds_with_consistent_shapes(
    name: str, variant: str
) -> None:
    teacher = resolve(name).meta_unet()
    student, report = build_student(teacher, variant)
    teacher_shapes = {k: v.shape for k, v in teacher.state_dict().items()}
    student_state = student.state_dict()
    assert set(report.copied) | set(report.fresh) == set(student_state)
    assert not set(report.copied) & set(report.fresh)
    for student_key, teacher_key in report.copied.items():
        assert student_state[student_key].shape == teacher_shapes[teacher_key]
    assert student.config.layers_per_block == 1
    assert count_params(student) < count_params(teacher)
    assert (student.mid_block is None) == (variant != "base")
    expected_stages = len(teacher.config.down_block_types) - (variant == "tiny")
    assert len(student.down_blocks) == len(student.up_blocks) == expected_stages


def test_builtin_teacher_list_names_the_four_configs() -> None:
    assert builtin_names() == ["sd-v1-4", "sd-v1-5", "sd-v2-1-base", "sdxl-base"]


def test_sd_v2_and_sdxl_keep_their_per_block_attention_settings() -> None:
    sd2 = resolve("sd-v2-1-base").meta_unet()
    sd2_student, _ = build_student(sd2, "tiny")
    assert list(sd2_student.config.attention_head_dim) == [5, 10, 20]
    assert sd2_student.config.use_linear_projection is True
    sdxl = resolve("sdxl-base").meta_unet()
    sdxl_student, _ = build_student(sdxl, "base")
    assert list(sdxl_student.config.transformer_layers_per_block) == [1, 2, 10]
    assert sdxl_student.config.addition_embed_type == "text_time"
    assert count_params(sdxl) == 2_567_463_684


def test_sdxl_tiny_reports_tensors_whose_teacher_source_has_another_width() -> None:
    # Dropping SDXL's deepest stage (1280 wide) feeds the new first up block 640 channels instead of
    # 1280, so its first resnet cannot be copied: it must be reported fresh, never partly copied.
    teacher = resolve("sdxl-base").meta_unet()
    _, report = build_student(teacher, "tiny")
    assert "up_blocks.0.resnets.0.conv1.weight" in report.fresh
    assert "shape" in report.fresh["up_blocks.0.resnets.0.conv1.weight"]


def test_every_copied_tensor_equals_its_teacher_source(tiny_teacher: UNet2DConditionModel) -> None:
    for variant in ("base", "small", "tiny"):
        student, report = build_student(tiny_teacher, variant)
        teacher_state, student_state = tiny_teacher.state_dict(), student.state_dict()
        assert report.fresh == {}
        for student_key, teacher_key in report.copied.items():
            assert torch.equal(student_state[student_key], teacher_state[teacher_key]), student_key


def test_up_blocks_keep_the_teachers_first_and_last_layer(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    _, report = build_student(tiny_teacher, "base")
    prefix = "up_blocks.1.resnets"
    assert report.copied[f"{prefix}.0.conv1.weight"] == f"{prefix}.0.conv1.weight"
    assert report.copied[f"{prefix}.1.conv1.weight"] == f"{prefix}.2.conv1.weight"
    attention = "up_blocks.2.attentions.1.proj_in.weight"
    assert report.copied[attention] == "up_blocks.2.attentions.2.proj_in.weight"
    assert (
        report.copied["down_blocks.1.resnets.0.conv1.weight"]
        == "down_blocks.1.resnets.0.conv1.weight"
    )


def test_teachers_middle_up_layer_would_not_fit_the_students_last(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    # Why the map takes the LAST teacher layer: the middle one has another input width (the skip
    # connection of the last layer comes from the previous stage's downsampler).
    student, _ = build_student(tiny_teacher, "base")
    student_shape = student.state_dict()["up_blocks.1.resnets.1.conv1.weight"].shape
    middle = tiny_teacher.state_dict()["up_blocks.1.resnets.1.conv1.weight"].shape
    assert student_shape != middle


def test_tiny_variant_maps_up_blocks_past_the_dropped_stage(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    _, report = build_student(tiny_teacher, "tiny")
    assert (
        report.copied["up_blocks.0.resnets.0.conv1.weight"] == "up_blocks.1.resnets.0.conv1.weight"
    )
    assert report.block_pairs == [
        ("down_blocks.0", "down_blocks.0"),
        # The student's last block has no downsampler, the teacher's does: paired before it.
        ("down_blocks.1.attentions.0.proj_out", "down_blocks.1.attentions.1.proj_out"),
        ("up_blocks.0", "up_blocks.1"),
        ("up_blocks.1", "up_blocks.2"),
    ]


def test_sd_v1_4_tiny_pairs_are_bk_sdm_tinys_feature_kd_layers() -> None:
    # BK-SDM's kd_train_text_to_image.py, bk_tiny: mapping_layers_stu / mapping_layers_tea.
    _, report = build_student(builtin_config("sd-v1-4"), "tiny")
    assert [student for student, _ in report.block_pairs] == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2.attentions.0.proj_out",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    assert [teacher for _, teacher in report.block_pairs] == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2.attentions.1.proj_out",
        "up_blocks.1",
        "up_blocks.2",
        "up_blocks.3",
    ]


def test_teacher_config_alone_builds_a_meta_student_with_the_same_report(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    student, report = build_student(dict(tiny_teacher.config), "base")
    _, report_from_weights = build_student(tiny_teacher, "base")
    assert student.device.type == "meta"
    assert report.copied == report_from_weights.copied


def test_tiny_student_forward_gives_a_finite_noise_prediction(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    student, _ = build_student(tiny_teacher, "base")
    torch.manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16)
    with torch.no_grad():
        out = student(sample, torch.tensor([10, 900]), text).sample
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()


def test_initialized_student_starts_close_to_the_teacher(
    tiny_teacher: UNet2DConditionModel,
) -> None:
    # Copied layers make the student a pruned teacher, far closer to it than a random init is.
    student, _ = build_student(tiny_teacher, "base")
    random_student = UNet2DConditionModel.from_config(student.config)
    torch.manual_seed(2)
    sample, text, t = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 16), torch.tensor([50] * 4)
    with torch.no_grad():
        target = tiny_teacher(sample, t, text).sample
        initialized = torch.nn.functional.mse_loss(student(sample, t, text).sample, target)
        fresh = torch.nn.functional.mse_loss(random_student(sample, t, text).sample, target)
    assert initialized < fresh


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_saved_student_reloads_with_plain_diffusers(
    tiny_teacher: UNet2DConditionModel, variant: str, tmp_path
) -> None:
    student, _ = build_student(tiny_teacher, variant)
    student.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(reloaded.config) == public(student.config)
    reloaded_state = reloaded.state_dict()
    for key, tensor in student.state_dict().items():
        assert torch.equal(reloaded_state[key], tensor), key


def test_base_variant_of_a_one_layer_teacher_is_refused() -> None:
    from core.errors import UserInputError

    with pytest.raises(UserInputError, match="layers_per_block=1"):
        build_student(make_tiny_teacher(layers_per_block=1), "base")
