"""evaluate(): teacher and student through generation, metrics, cost and report, end to end.

FID is left out here (no reference: it reports why) because its Inception passes and 2048-d
eigenproblem are what test_fid.py spends its time on.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from distill.errors import UserInputError
from eval.evaluate import evaluate
from eval.protocols import BK_SDM_COCO30K, get_protocol

PROMPTS = ["a photo of a Dress", "a photo of a Bag", "a photo of a Coat", "a photo of a Sneaker"]


def test_evaluate_reports_teacher_and_student_on_the_same_prompts_and_seeds(
    tmp_path: Path, teacher_pipeline, student_pipeline, tiny_clip, empty_torch_hub
) -> None:
    data = evaluate(
        student_pipeline,
        teacher_pipeline,
        PROMPTS,
        num_images=4,
        reference=None,
        out_dir=tmp_path,
        clip_model=tiny_clip,
        seed=7,
        num_inference_steps=2,
        inception_score_splits=2,
        allow_download=False,
        speed_warmup=0,
        speed_repeats=1,
        device="cpu",
        progress=False,
    )
    teacher, student = data["rows"]
    assert (teacher["name"], student["name"]) == ("teacher", "student")
    for name in ("teacher", "student"):
        manifest = json.loads((tmp_path / "images" / name / "manifest.json").read_text())
        assert [image["seed"] for image in manifest["images"]] == [7, 8, 9, 10]
        assert [image["prompt"] for image in manifest["images"]] == PROMPTS

    for row in (teacher, student):
        metrics = row["metrics"]
        assert metrics["fid"]["unavailable"] == "no FID reference"
        assert "classifier head" in metrics["is"]["unavailable"]
        assert metrics["clip"]["n"] == 4 and "seeds 7..10" in metrics["clip"]["detail"]
        assert 0.0 <= metrics["clip"]["value"] <= 1.0
        assert metrics["unet_latency"]["value"] > 0 and metrics["pipeline_latency"]["n"] == 1
    assert student["metrics"]["params"]["value"] < teacher["metrics"]["params"]["value"]
    assert student["metrics"]["gflops"]["value"] < teacher["metrics"]["gflops"]["value"]

    report = (tmp_path / "report.md").read_text()
    assert "| teacher |" in report and "| student |" in report
    assert "![comparison grid](comparison_grid.png)" in report
    assert (tmp_path / "comparison_grid.png").is_file()


def test_too_few_images_for_the_inception_score_splits_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="Inception Score splits"):
        evaluate(None, None, PROMPTS, 4, None, tmp_path, inception_score_splits=10)


def test_bk_sdm_protocol_is_complete_evaluate_configuration() -> None:
    """Every protocol setting is an evaluate() argument, so the protocol alone reproduces a run."""
    bound = inspect.signature(evaluate).bind(
        "student",
        "teacher",
        reference="coco-val2014-256",
        out_dir="out",
        **BK_SDM_COCO30K.evaluate_kwargs(),
    )
    assert bound.arguments["num_inference_steps"] == 25
    assert bound.arguments["guidance_scale"] == 7.5
    assert (bound.arguments["height"], bound.arguments["output_size"]) == (512, 256)
    assert bound.arguments["scheduler"] == "pndm"
    assert bound.arguments["num_images"] == 30_000 and bound.arguments["prompts"] == "coco30k"
    assert get_protocol("bk-sdm-coco30k") is BK_SDM_COCO30K
    with pytest.raises(UserInputError, match="unknown evaluation protocol"):
        get_protocol("nope")
