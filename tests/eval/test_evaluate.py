"""evaluate(): teacher and student through generation, metrics, cost and report, end to end.

Sets are tiny (4 to 10 images, 2 denoising steps): the Inception pass costs ~0.2 s per image here,
and the exactness of each metric is tested in its own module; these tests check that the pieces
meet: the right images reach each metric, stale images never do, and the report says what it
could not compute.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from core.errors import UserInputError
from core.fingerprints import pipeline_fingerprint
from eval.evaluate import evaluate
from eval.image_io import open_rgb, to_uint8_tensor
from eval.protocols import BK_SDM_COCO30K, evaluate_arguments, get_protocol
from eval.report import metrics_fingerprints
from offline.fashion_classifier import classifier_input
from offline.fashion_mnist import fashion_prompts, load_fashion_mnist_arrays
from testkit.evaluation import QUICK, quick_evaluate

PROMPTS = ["a photo of a Dress", "a photo of a Bag", "a photo of a Coat", "a photo of a Sneaker"]


def table_lines(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("| ")]


def real_reference(folder: Path, count: int) -> Path:
    """`count` real Fashion-MNIST test images as 32 px PNGs: an FID reference folder."""
    images, _ = load_fashion_mnist_arrays("test")
    pixels = classifier_input(torch.from_numpy(images[-count:].copy())[:, None])  # (N, 1, 32, 32)
    grey = ((pixels[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    folder.mkdir(parents=True)
    for index, image in enumerate(grey):
        Image.fromarray(image).convert("RGB").save(folder / f"{index}.png")
    return folder


def test_evaluate_reports_teacher_and_student_on_the_same_prompts_and_seeds(
    tmp_path: Path,
    teacher_pipeline,
    student_pipeline,
    tiny_clip,
    direct_cosines,
    empty_torch_hub,
) -> None:
    data = quick_evaluate(
        student_pipeline,
        teacher_pipeline,
        PROMPTS,
        tmp_path,
        num_images=4,
        reference=None,
        clip_model=tiny_clip,
        seed=7,
    )
    teacher, student = data["rows"]
    assert (teacher["name"], student["name"]) == ("teacher", "student")
    for name in ("teacher", "student"):
        manifest = json.loads((tmp_path / "images" / name / "manifest.json").read_text())
        assert [image["seed"] for image in manifest["images"]] == [7, 8, 9, 10]
        assert [image["prompt"] for image in manifest["images"]] == PROMPTS

    for row in (teacher, student):
        metrics = row["metrics"]
        assert metrics["fid"]["unavailable"] == "no FID reference given"
        assert "classifier head" in metrics["is"]["unavailable"]
        # CLIP of the images on disk, computed straight from the CLIPModel: the right images
        # and prompts reached the metric, on the 0-1 scale.
        files = sorted((tmp_path / "images" / row["name"]).glob("*.png"))
        expected = direct_cosines(tiny_clip, [open_rgb(f) for f in files], PROMPTS).mean().item()
        assert expected > 0.05  # clearly above torchmetrics' clamp at 0
        assert metrics["clip"]["value"] == pytest.approx(expected, abs=1e-5)
        assert metrics["clip"]["n"] == 4 and "seeds 7..10" in metrics["clip"]["detail"]
        assert metrics["unet_latency"]["value"] > 0 and metrics["pipeline_latency"]["n"] == 1
        assert row["generation"]["images_per_second"] > 0
        assert "class_accuracy" not in metrics  # these prompts are not the offline world's
    assert student["metrics"]["params"]["value"] < teacher["metrics"]["params"]["value"]
    assert student["metrics"]["gflops"]["value"] < teacher["metrics"]["gflops"]["value"]
    fidelity = student["metrics"]["fidelity_fid"]
    assert fidelity["n"] == 4 and fidelity["interval"][0] < fidelity["value"]
    assert "fidelity_fid" not in teacher["metrics"]
    assert metrics_fingerprints(data) == {
        "teacher": pipeline_fingerprint(teacher_pipeline),
        "student": pipeline_fingerprint(student_pipeline),
    }

    report = (tmp_path / "report.md").read_text()
    header, teacher_line, student_line = table_lines(report)
    assert "fidelity FID" in header and "class acc." not in header
    assert teacher_line.startswith("| teacher | n/a¹ | — |")  # FID n/a, no fidelity to itself
    assert "| n/a² |" in teacher_line  # Inception IS
    assert "¹ FID ↓ [95% interval], teacher, student: no FID reference given" in report
    assert "² IS (Inception) ↑, teacher, student: no Inception classifier head offline" in report
    assert "unavailable" not in "\n".join(table_lines(report))
    assert "n = 4 images, prompt i generated with seed 7 + i (seeds 7..10)" in report
    assert "![comparison grid](comparison_grid.png)" in report
    assert (tmp_path / "comparison_grid.png").is_file()


def test_fashion_prompts_get_in_domain_metrics_beside_intervals_and_fidelity(
    tmp_path: Path, teacher_pipeline, student_pipeline, fashion_judge, empty_torch_hub
) -> None:
    prompts = fashion_prompts(10, seed=0)
    data = quick_evaluate(
        student_pipeline,
        teacher_pipeline,
        "fashion",
        tmp_path / "eval",
        num_images=10,
        reference=real_reference(tmp_path / "reference", 10),
        bootstrap_resamples=200,
        plugins={"fashion_classifier": fashion_judge},
    )
    report = (tmp_path / "eval" / "report.md").read_text()
    header, teacher_line, student_line = table_lines(report)
    columns = [cell.strip() for cell in header.split("|")[2:-1]]
    assert columns[:6] == [
        "FID ↓ [95% interval]",
        "fidelity FID ↓ (to teacher)",
        "CLIP ↑ (cosine)",
        "IS (Inception) ↑",
        "class acc. (in-domain) ↑",
        "IS (in-domain) ↑",
    ]
    for line in (teacher_line, student_line):
        cells = [cell.strip() for cell in line.split("|")[2:-1]]
        assert "[" in cells[0] and cells[2].startswith("n/a")  # FID interval; CLIP n/a
        assert cells[3].startswith("n/a") and cells[4].endswith("%") and float(cells[5]) >= 1
    assert "no CLIP model given" in report
    assert "Student − teacher FID:" in report
    assert f"test accuracy {100 * fashion_judge.test_accuracy:.2f}%" in report

    for row in data["rows"]:
        # Class accuracy by hand: the classifier on the saved PNGs, class i % 10 for prompt i.
        files = sorted((tmp_path / "eval" / "images" / row["name"]).glob("*.png"))
        uint8 = torch.stack([to_uint8_tensor(open_rgb(f)) for f in files])  # (10, 3, 32, 32)
        predicted = fashion_judge.predict(uint8)
        expected = float((predicted == torch.arange(10) % 10).float().mean())
        assert row["metrics"]["class_accuracy"]["value"] == pytest.approx(expected)
        assert row["metrics"]["in_domain_is"]["n"] == 10
        fid = row["metrics"]["fid"]
        assert fid["interval"][0] < fid["value"] < fid["interval"][1]
        assert "200 half-samples (5 of the 10 images, without replacement), seed 0" in fid["detail"]
    assert [
        image["prompt"]
        for image in json.loads(
            (tmp_path / "eval" / "images" / "student" / "manifest.json").read_text()
        )["images"]
    ] == prompts
    assert data["comparisons"]["fid_student_minus_teacher"]["interval"] is not None


def test_retrained_weights_at_the_same_path_are_evaluated_anew(
    tmp_path: Path, student_pipeline, empty_torch_hub, random_images
) -> None:
    """The stale-evaluation reproducer: evaluate a pipeline folder, evaluate it again (images
    reused, the identical FID), then halve every UNet weight in place at the same path: the
    images and the FID must change."""
    model = tmp_path / "student_pipeline"
    student_pipeline.save_pretrained(model)
    reference = tmp_path / "reference"
    reference.mkdir()
    for index, image in enumerate(random_images(4, size=32)):
        image.save(reference / f"{index}.png")
    run = lambda: quick_evaluate(
        str(model),
        None,
        PROMPTS,
        tmp_path / "eval",
        num_images=4,
        reference=reference,
        bootstrap_resamples=50,
    )
    image_file = tmp_path / "eval" / "images" / "student" / "000000.png"

    first = run()
    first_pixels, first_mtime = np.asarray(Image.open(image_file)), image_file.stat().st_mtime_ns
    again = run()
    assert image_file.stat().st_mtime_ns == first_mtime  # reused
    assert (
        again["rows"][0]["metrics"]["fid"]["value"] == first["rows"][0]["metrics"]["fid"]["value"]
    )
    assert again["rows"][0]["generation"]["images_computed"] == 0

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.mul_(0.5)
    unet.save_pretrained(model / "unet")  # same path, new weights
    retrained = run()

    assert retrained["rows"][0]["generation"]["stale"].startswith("model fingerprint changed")
    assert not np.array_equal(np.asarray(Image.open(image_file)), first_pixels)
    fids = [data["rows"][0]["metrics"]["fid"]["value"] for data in (first, retrained)]
    assert fids[0] != pytest.approx(fids[1], rel=1e-3)
    assert metrics_fingerprints(retrained)["student"] == pipeline_fingerprint(model)
    assert metrics_fingerprints(retrained)["student"] != metrics_fingerprints(first)["student"]


def test_too_few_images_for_the_inception_score_splits_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="Inception Score splits"):
        quick_evaluate(None, None, PROMPTS, tmp_path, num_images=4, inception_score_splits=10)


def test_bk_sdm_protocol_is_complete_evaluate_configuration() -> None:
    """Every protocol setting is an evaluate() argument, so the protocol alone reproduces a run."""
    settings = BK_SDM_COCO30K.evaluate_kwargs() | {"reference": "coco-val2014-256"}
    bound = inspect.signature(evaluate).bind(
        "student", "teacher", out_dir="out", **evaluate_arguments(settings)
    )
    generation, options = bound.arguments["generation"], bound.arguments["options"]
    assert (generation.num_inference_steps, generation.guidance_scale) == (25, 7.5)
    assert (generation.height, generation.output_size, generation.seed) == (512, 256, 1234)
    assert generation.scheduler == "pndm" and generation.seeding == "per-image"
    assert options.clip_model == "open_clip:ViT-g-14:laion2b_s34b_b88k"
    assert options.reference_resize == 256 and options.reference == "coco-val2014-256"
    assert bound.arguments["num_images"] == 30_000 and bound.arguments["prompts"] == "coco30k"
    parity = evaluate_arguments(settings, parity="bk-sdm")
    assert (parity["generation"].seeding, parity["generation"].batch_size) == ("one-generator", 1)
    assert parity["generation"].image_format == "jpeg"
    assert parity["options"].fid_preprocessing == "pytorch-fid"
    assert get_protocol("bk-sdm-coco30k") is BK_SDM_COCO30K
    with pytest.raises(UserInputError, match="unknown evaluation protocol"):
        get_protocol("nope")


def test_a_student_scored_at_several_step_counts_gets_a_row_each_and_a_latency_plot(
    tmp_path: Path, teacher_pipeline, student_pipeline
) -> None:
    """One row per step count of the student, on the same prompts and seeds; UNet evaluations
    per image are steps × 2 with classifier-free guidance, steps × 1 for a few-step student
    reading its guidance through an embedding (kept on its own LCMScheduler); FID against
    pipeline latency is plotted."""
    from diffusers import LCMScheduler

    from distill.kinds.consistency import with_guidance_embedding

    reference = real_reference(tmp_path / "reference", 8)
    few_step = with_guidance_embedding(student_pipeline.unet, 32)
    lcm = type(student_pipeline)(
        **{
            **student_pipeline.components,
            "unet": few_step,
            "scheduler": LCMScheduler.from_config(student_pipeline.scheduler.config),
        },
    )
    options = QUICK | {"inception_score_splits": 1, "bootstrap_resamples": 0}
    data = evaluate(
        lcm,
        teacher_pipeline,
        PROMPTS * 2,
        tmp_path / "out",
        student_steps=[1, 2],
        **evaluate_arguments(options | {"reference": reference}),
    )
    names = [row["name"] for row in data["rows"]]
    assert names == ["teacher", "student, 1 step", "student, 2 steps"]
    evals = {row["name"]: row["metrics"]["unet_evals"]["value"] for row in data["rows"]}
    assert evals == {"teacher": 2 * 2, "student, 1 step": 1, "student, 2 steps": 2}
    for row in data["rows"][1:]:
        manifest = json.loads(
            (
                tmp_path
                / "out"
                / "images"
                / row["name"].replace(", ", "-").replace(" ", "-")
                / "manifest.json"
            ).read_text()
        )
        assert manifest["settings"]["scheduler"] == "lcm"  # its own, not the protocol's PNDM
        assert manifest["settings"]["num_inference_steps"] == row["steps"]
        assert [image["seed"] for image in manifest["images"]] == list(range(8))
        assert row["metrics"]["fidelity_fid"]["value"] >= 0
    assert metrics_fingerprints(data).keys() == {"teacher", "student"}
    assert (tmp_path / "out" / "fid_latency.png").is_file() and data["plot"]["file"]
    assert "fid_latency.png" in (tmp_path / "out" / "report.md").read_text()


def test_parity_bk_sdm_runs_their_generation_and_scoring_end_to_end(
    tmp_path: Path, student_pipeline, empty_torch_hub
) -> None:
    """`--parity bk-sdm` through evaluate(): one generator, batch 1, JPEG files, FID through
    pytorch-fid's preprocessing (reference too), all recorded in metrics.json and the report."""
    reference = real_reference(tmp_path / "reference", 4)
    settings = QUICK | {"num_images": 4, "reference": reference, "bootstrap_resamples": 0}
    arguments = evaluate_arguments(settings | {"seed": 1234}, parity="bk-sdm")
    data = evaluate(student_pipeline, None, PROMPTS, tmp_path / "parity", **arguments)

    folder = tmp_path / "parity" / "images" / "student"
    assert sorted(p.name for p in folder.glob("*.jpg")) == [f"{i:06d}.jpg" for i in range(4)]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["seeding"] == "one-generator"
    assert manifest["settings"]["batch_size"] == 1
    assert data["settings"]["fid_preprocessing"] == "pytorch-fid"
    fid = data["rows"][0]["metrics"]["fid"]
    assert "pytorch-fid" in fid["detail"] and "one generator seeded 1234" in fid["detail"]
    report = (tmp_path / "parity" / "report.md").read_text()
    assert "from one generator seeded 1234 (BK-SDM's seeding)" in report
