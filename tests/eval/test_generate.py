"""Generation: per-image seeds, PNGs written as made, interrupted runs resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.errors import UserInputError
from eval.generate import MANIFEST, generate_images, image_path

PROMPTS = ["a photo of a Dress", "a photo of a Bag", "a photo of a Coat", "a photo of a Sneaker"]
FAST = {"num_inference_steps": 2, "guidance_scale": 7.5, "progress": False}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_resume_regenerates_only_the_missing_image_identically(
    tmp_path: Path, student_pipeline
) -> None:
    first = generate_images(student_pipeline, PROMPTS, tmp_path, base_seed=10, batch_size=4, **FAST)
    assert first.newly_generated == [0, 1, 2, 3]
    assert first.seeds == [10, 11, 12, 13]
    original = pixels(image_path(tmp_path, 2))
    kept_mtimes = {i: image_path(tmp_path, i).stat().st_mtime_ns for i in (0, 1, 3)}

    image_path(tmp_path, 2).unlink()  # as if the run had died before writing it
    second = generate_images(
        student_pipeline, PROMPTS, tmp_path, base_seed=10, batch_size=4, **FAST
    )

    assert second.newly_generated == [2]
    # Generated alone (batch of 1) it equals the batch-of-4 original: one generator per image.
    np.testing.assert_array_equal(pixels(image_path(tmp_path, 2)), original)
    assert {i: image_path(tmp_path, i).stat().st_mtime_ns for i in (0, 1, 3)} == kept_mtimes
    assert not list(tmp_path.glob("*.partial"))


def test_images_differ_across_seeds_and_manifest_records_them(
    tmp_path: Path, student_pipeline
) -> None:
    result = generate_images(
        student_pipeline, PROMPTS[:2], tmp_path, base_seed=0, output_size=16, **FAST
    )
    assert [Image.open(p).size for p in result.paths] == [(16, 16), (16, 16)]
    assert not np.array_equal(pixels(result.paths[0]), pixels(result.paths[1]))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["images"][1] == {"file": "000001.png", "prompt": PROMPTS[1], "seed": 1}
    assert manifest["settings"]["num_inference_steps"] == 2
    assert manifest["settings"]["height"] == 32  # the pipeline's native size
    assert manifest["settings"]["output_size"] == 16


def test_rerun_with_other_settings_or_prompts_is_refused(tmp_path: Path, student_pipeline) -> None:
    generate_images(student_pipeline, PROMPTS[:1], tmp_path, **FAST)
    with pytest.raises(UserInputError, match="other settings"):
        generate_images(student_pipeline, PROMPTS[:1], tmp_path, **{**FAST, "guidance_scale": 1.0})
    with pytest.raises(UserInputError, match="was made for prompt"):
        generate_images(student_pipeline, PROMPTS[1:2], tmp_path, **FAST)


def test_scheduler_is_swapped_for_the_call_only(tmp_path: Path, student_pipeline) -> None:
    own_scheduler = student_pipeline.scheduler
    generate_images(student_pipeline, PROMPTS[:1], tmp_path, scheduler="ddim", **FAST)
    assert student_pipeline.scheduler is own_scheduler
    with pytest.raises(UserInputError, match="unknown scheduler"):
        generate_images(student_pipeline, PROMPTS[:1], tmp_path / "x", scheduler="nope", **FAST)


def test_no_prompts_is_a_user_error(tmp_path: Path, student_pipeline) -> None:
    with pytest.raises(UserInputError, match="no prompts"):
        generate_images(student_pipeline, [], tmp_path, **FAST)
