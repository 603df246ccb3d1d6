"""Generation: per-image seeds, fixed batches, PNGs written as made, resumes exact, never stale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserInputError
from eval.generate import (
    MANIFEST,
    GenerationSettings,
    delete_generated_images,
    generate_images,
    image_path,
)

PROMPTS = ["a photo of a Dress", "a photo of a Bag", "a photo of a Coat", "a photo of a Sneaker"]
QUIET = {"progress": False}


def fast(**changes) -> GenerationSettings:
    """Two denoising steps: enough to tell images apart."""
    return GenerationSettings(**{"num_inference_steps": 2, "guidance_scale": 7.5, **changes})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def mtimes(folder: Path, indices) -> dict[int, int]:
    return {i: image_path(folder, i).stat().st_mtime_ns for i in indices}


def test_resume_regenerates_only_the_missing_image_identically(
    tmp_path: Path, student_pipeline
) -> None:
    first = generate_images(
        student_pipeline, PROMPTS, tmp_path, fast(seed=10, batch_size=4), **QUIET
    )
    assert first.newly_generated == [0, 1, 2, 3]
    assert first.seeds == [10, 11, 12, 13]
    original = pixels(image_path(tmp_path, 2))
    kept_mtimes = mtimes(tmp_path, (0, 1, 3))

    image_path(tmp_path, 2).unlink()  # as if the run had died before writing it
    second = generate_images(
        student_pipeline, PROMPTS, tmp_path, fast(seed=10, batch_size=4), **QUIET
    )

    assert second.newly_generated == [2]
    # Batches are fixed by index: image 2 is made again inside the same batch of 4 (0..3), since
    # made alone (a batch of 1) it differs from the original in the last bit on this CPU. Only
    # the missing file is written; the other three keep their files and mtimes.
    assert second.images_computed == 4
    np.testing.assert_array_equal(pixels(image_path(tmp_path, 2)), original)
    assert mtimes(tmp_path, (0, 1, 3)) == kept_mtimes
    assert not list(tmp_path.glob("*.partial"))


def test_batches_are_fixed_by_index(tmp_path: Path, student_pipeline) -> None:
    """With batch size 2 a missing image 3 costs the batch (2, 3), not a batch of its own."""
    generate_images(student_pipeline, PROMPTS[:3], tmp_path, fast(batch_size=2), **QUIET)
    image_path(tmp_path, 2).unlink()
    resumed = generate_images(student_pipeline, PROMPTS[:3], tmp_path, fast(batch_size=2), **QUIET)
    assert (resumed.newly_generated, resumed.images_computed) == ([2], 1)  # batch [2, 3) ∩ 3

    # A fourth prompt turns the last batch (2) into (2, 3): image 2 is made again beside image 3,
    # as a run of four from scratch would make it; images 0 and 1 stay.
    kept = mtimes(tmp_path, (0, 1))
    more = generate_images(student_pipeline, PROMPTS, tmp_path, fast(batch_size=2), **QUIET)
    assert (more.newly_generated, more.images_computed) == ([2, 3], 2)
    assert "batch changed" in more.stale and mtimes(tmp_path, (0, 1)) == kept


def test_manifest_records_fingerprint_settings_prompts_and_seeds(
    tmp_path: Path, student_pipeline
) -> None:
    result = generate_images(
        student_pipeline, PROMPTS[:2], tmp_path, fast(seed=0, output_size=16), **QUIET
    )
    assert [Image.open(p).size for p in result.paths] == [(16, 16), (16, 16)]
    assert not np.array_equal(pixels(result.paths[0]), pixels(result.paths[1]))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["images"][1] == {"file": "000001.png", "prompt": PROMPTS[1], "seed": 1}
    assert manifest["fingerprint"] == result.fingerprint and len(result.fingerprint) == 64
    settings = manifest["settings"]
    assert settings["num_inference_steps"] == 2
    assert settings["height"] == 32  # the pipeline's native size
    assert settings["output_size"] == 16
    assert (settings["batch_size"], settings["dtype"], settings["device"]) == (4, "float32", "cpu")


def test_a_changed_setting_deletes_the_old_images_and_regenerates(
    tmp_path: Path, student_pipeline
) -> None:
    generate_images(student_pipeline, PROMPTS[:2], tmp_path, fast(), **QUIET)
    before = pixels(image_path(tmp_path, 0))

    other = generate_images(
        student_pipeline, PROMPTS[:2], tmp_path, fast(guidance_scale=1), **QUIET
    )
    assert other.newly_generated == [0, 1]
    assert "guidance_scale" in other.stale
    assert not np.array_equal(pixels(image_path(tmp_path, 0)), before)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["settings"]["guidance_scale"] == 1


def test_a_changed_prompt_regenerates_only_its_image(tmp_path: Path, student_pipeline) -> None:
    generate_images(student_pipeline, PROMPTS, tmp_path, fast(batch_size=2), **QUIET)
    kept = mtimes(tmp_path, (0, 1, 2))
    changed = [*PROMPTS[:3], "a photo of a Trouser"]
    again = generate_images(student_pipeline, changed, tmp_path, fast(batch_size=2), **QUIET)
    assert again.newly_generated == [3] and again.stale == "1 images with another prompt or seed"
    assert mtimes(tmp_path, (0, 1, 2)) == kept

    shorter = generate_images(student_pipeline, changed[:2], tmp_path, fast(batch_size=2), **QUIET)
    assert shorter.newly_generated == [] and not image_path(tmp_path, 2).exists()


def test_changed_weights_regenerate_every_image(tmp_path: Path, student_pipeline) -> None:
    """The key is the weights' content, not the model's name: halving the UNet in place (same
    object, same name) makes every image anew."""
    first = generate_images(student_pipeline, PROMPTS[:2], tmp_path, fast(), **QUIET)
    before = pixels(image_path(tmp_path, 0))
    with torch.no_grad():
        for parameter in student_pipeline.unet.parameters():
            parameter.mul_(0.5)

    second = generate_images(student_pipeline, PROMPTS[:2], tmp_path, fast(), **QUIET)
    assert second.fingerprint != first.fingerprint
    assert second.newly_generated == [0, 1] and "fingerprint changed" in second.stale
    assert not np.array_equal(pixels(image_path(tmp_path, 0)), before)


def test_deleting_generated_images_leaves_other_files(tmp_path: Path, student_pipeline) -> None:
    generate_images(student_pipeline, PROMPTS[:2], tmp_path, fast(), **QUIET)
    (tmp_path / "notes.txt").write_text("mine")
    assert delete_generated_images(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_scheduler_is_swapped_for_the_call_only(tmp_path: Path, student_pipeline) -> None:
    own_scheduler = student_pipeline.scheduler
    generate_images(student_pipeline, PROMPTS[:1], tmp_path, fast(scheduler="ddim"), **QUIET)
    assert student_pipeline.scheduler is own_scheduler
    with pytest.raises(UserInputError, match="unknown scheduler"):
        generate_images(
            student_pipeline, PROMPTS[:1], tmp_path / "x", fast(scheduler="nope"), **QUIET
        )


def test_no_prompts_is_a_user_error(tmp_path: Path, student_pipeline) -> None:
    with pytest.raises(UserInputError, match="no prompts"):
        generate_images(student_pipeline, [], tmp_path, fast(), **QUIET)


def test_bk_sdm_parity_makes_the_images_of_their_generate_script_bit_for_bit(
    tmp_path: Path, student_pipeline
) -> None:
    """`--parity bk-sdm` generation against a loop written the way BK-SDM's `src/generate.py`
    and `change_img_size` run: one generator seeded once, prompts in order, batch 1, the image
    saved as .jpg, opened again, `resize((s, s))`, saved as .jpg. Then a resume from the stored
    generator state makes the same files again."""
    prompts = PROMPTS + PROMPTS[:2]
    size = 16
    settings = fast(seed=1234, batch_size=1, seeding="one-generator", image_format="jpeg")
    settings = GenerationSettings(**{**settings.to_dict(), "output_size": size})
    ours = generate_images(student_pipeline, prompts, tmp_path / "ours", settings, **QUIET)

    theirs_512, theirs_256 = tmp_path / "im512", tmp_path / "im256"
    theirs_512.mkdir(), theirs_256.mkdir()
    generator = torch.Generator(device="cpu").manual_seed(1234)
    student_pipeline.set_progress_bar_config(disable=True)
    for index, prompt in enumerate(prompts):
        image = student_pipeline(
            [prompt], num_inference_steps=2, guidance_scale=7.5, generator=generator
        ).images[0]
        image.save(theirs_512 / f"{index:06d}.jpg")
    for name in sorted(p.name for p in theirs_512.iterdir()):
        Image.open(theirs_512 / name).resize((size, size)).save(theirs_256 / name)

    assert [p.name for p in ours.paths] == sorted(p.name for p in theirs_256.iterdir())
    for path in ours.paths:
        assert path.read_bytes() == (theirs_256 / path.name).read_bytes(), path.name
    # The draws differ from image to image (one generator, not one seed per image reused).
    assert ours.paths[0].read_bytes() != ours.paths[4].read_bytes()

    # Killed after image 1: images 2.. and the state after image 1 gone. The resume restarts
    # from the state stored after image 0 and writes the same bytes.
    before = {path.name: path.read_bytes() for path in ours.paths}
    for index in range(2, len(prompts)):
        ours.paths[index].unlink()
    (tmp_path / "ours" / "generator" / "000001.state").unlink()
    resumed = generate_images(student_pipeline, prompts, tmp_path / "ours", settings, **QUIET)
    assert resumed.images_computed == len(prompts) - 1  # from image 1 on
    assert {path.name: path.read_bytes() for path in resumed.paths} == before

    # Another seed: every image and every stored state goes (a state of the old seed must never
    # seed a resume of the new one).
    reseeded = GenerationSettings(**{**settings.to_dict(), "seed": 99})
    other = generate_images(student_pipeline, prompts, tmp_path / "ours", reseeded, **QUIET)
    assert "generation settings changed (seed)" in other.stale
    assert other.paths[0].read_bytes() != before[other.paths[0].name]
