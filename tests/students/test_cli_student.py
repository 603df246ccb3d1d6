"""`distill student`: figures, JSON, saving, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from cli import main
from testkit.unets import make_tiny_teacher

JSON_KEYS = {
    "teacher_params",
    "student_params",
    "teacher_gflops",
    "student_gflops",
    "copied_tensors",
    "fresh_tensors",
}


def test_console_script_prints_the_sd_v1_4_figures() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "student",
            "--teacher",
            "sd-v1-4",
            "--variant",
            "base",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(result.stdout)
    assert JSON_KEYS <= set(figures)
    assert figures["teacher_params"] == 859_520_964
    assert figures["student_params"] == 579_384_964
    assert figures["teacher_gflops"] == pytest.approx(803.3)
    assert figures["student_gflops"] == pytest.approx(523.0)
    assert figures["fresh_tensors"] == 0


def test_table_output_names_params_and_gflops(capsys) -> None:
    assert main(["student", "--teacher", "sd-v1-4", "--variant", "small"]) == 0
    out = capsys.readouterr().out
    assert "482,346,884" in out and "859,520,964" in out
    assert "GFLOPs" in out and "copied" in out


@pytest.fixture
def teacher_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pipeline"
    make_tiny_teacher().save_pretrained(folder / "unet")
    return folder


def test_out_saves_a_student_that_reloads(teacher_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "student"
    assert (
        main(
            [
                "student",
                "--teacher",
                str(teacher_folder),
                "--variant",
                "base",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out)
    reloaded = UNet2DConditionModel.from_pretrained(out)
    teacher = UNet2DConditionModel.from_pretrained(teacher_folder / "unet")
    assert reloaded.config.layers_per_block == 1
    assert figures["fresh_tensors"] == 0
    assert torch.equal(
        reloaded.state_dict()["up_blocks.1.resnets.1.conv1.weight"],
        teacher.state_dict()["up_blocks.1.resnets.2.conv1.weight"],
    )
    report = json.loads((out / "init_report.json").read_text())
    assert len(report["copied"]) == figures["copied_tensors"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_variant_is_one_line_and_exit_2(capsys, tmp_path: Path) -> None:
    assert main(["student", "--teacher", "sd-v1-4", "--variant", "huge"]) == 2
    assert "huge" in _one_line_error(capsys)


def test_teacher_already_at_one_layer_is_refused_for_base(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "unet"
    make_tiny_teacher(layers_per_block=1).save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["student", "--teacher", str(folder), "--variant", "base", "--out", str(out)]) == 2
    assert "layers_per_block=1" in _one_line_error(capsys)
    assert not out.exists()


def test_folder_that_is_not_a_unet_or_pipeline_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert main(["student", "--teacher", str(tmp_path), "--variant", "base"]) == 2
    assert "neither" in _one_line_error(capsys)


def test_unreadable_config_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{not json")
    assert main(["student", "--teacher", str(tmp_path), "--variant", "base"]) == 2
    assert "unreadable config" in _one_line_error(capsys)


def test_out_with_a_builtin_teacher_is_refused_before_writing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["student", "--teacher", "sd-v1-4", "--out", str(out)]) == 2
    assert "real teacher weights" in _one_line_error(capsys)
    assert not out.exists()


def test_unknown_teacher_name_is_refused(capsys) -> None:
    assert main(["student", "--teacher", "sd-v9", "--variant", "base"]) == 2
    assert "sd-v9" in _one_line_error(capsys)
