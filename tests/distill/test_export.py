"""Export: a finished run becomes a plain diffusers pipeline folder with a model card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli import main
from core.fingerprints import pipeline_fingerprint
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe

FRESH_PROCESS_LOAD = """
import sys
import diffusers
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe("a photo of a sneaker", num_inference_steps=2, output_type="np").images[0]
toolkit = [m for m in sys.modules if m.split(".")[0] in ("distill", "students", "eval")]
print(image.shape, pipe.unet.dtype, toolkit)
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    teachers = {"a": make_tiny_pipeline(root / "a", 1), "b": make_tiny_pipeline(root / "b", 2)}
    raw = tiny_recipe(root, teachers)
    raw["stages"] = [raw["stages"][0] | {"steps": 1}, raw["stages"][2] | {"steps": 1}]
    DistillationTrainer(validate_recipe(raw), progress=False).train()
    return Path(raw["output_dir"])


def test_exported_pipeline_loads_in_a_fresh_process_with_only_diffusers(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), str(out)]) == 0
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files)
    assert "diffusion_pytorch_model.safetensors" in files and "model_index.json" in files
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "(32, 32, 3) torch.float32 []"


def test_fp16_export_stores_half_precision_weights(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported16"
    assert main(["export", str(finished_run), str(out), "--dtype", "fp16"]) == 0
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (out / part).glob("*.safetensors")
        assert {t.dtype for t in load_file(weights).values()} == {torch.float16}, part
    assert "torch_dtype=torch.float16" in (out / "README.md").read_text()


def test_model_card_names_teachers_variant_stages_data_and_steps(
    finished_run: Path, tmp_path: Path
) -> None:
    metrics = _metrics(tmp_path, pipeline_fingerprint(finished_run / "student_pipeline"))
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), str(out), "--metrics", str(metrics)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    for fact in (
        "`base` variant",
        "`a`:",
        "`b`:",
        "1. denoise",
        "2. layer_matching",
        "fashion-mnist",
        "at 32 px",
        "12.5",
    ):
        assert fact in card, fact
    assert "| student UNet |" in card and "| teacher UNet (`a`) |" in card


def test_the_card_is_hub_ready_and_round_trips(finished_run: Path, tmp_path: Path) -> None:
    """huggingface_hub reads back the lineage, data, license and the model-index of the scores
    that describe these weights."""
    from huggingface_hub import ModelCard

    metrics = _metrics(tmp_path, pipeline_fingerprint(finished_run / "student_pipeline"))
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), str(out), "--metrics", str(metrics)]) == 0
    data = ModelCard.load(out / "README.md").data
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
    assert "knowledge-distillation" in data.tags
    assert data.datasets == ["zalando-datasets/fashion_mnist"]  # the builtin source's hub copy
    assert data.license == "other"  # the tiny teachers carry no license of their own
    assert data.base_model is None  # local teachers: no hub lineage to link
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value, result.task_type) == (
        "FID",
        12.5,
        "text-to-image",
    )
    reloaded = ModelCard.load(out / "README.md")
    assert reloaded.data.to_dict() == data.to_dict()

    # Metrics of other weights: no model-index at all.
    other = tmp_path / "other"
    other.mkdir()
    stale = _metrics(other, "0" * 64)
    assert main(["export", str(finished_run), str(tmp_path / "e2"), "--metrics", str(stale)]) == 0
    assert not ModelCard.load(tmp_path / "e2" / "README.md").data.eval_results


def test_card_data_names_hub_teachers_and_inherits_a_local_teachers_license(
    tmp_path: Path,
) -> None:
    from distill.card_data import card_data
    from distill.recipe import validate_recipe
    from testkit.tiny_world import tiny_recipe

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# SD\n")
    raw = tiny_recipe(tmp_path, {"a": teacher, "b": teacher})
    raw["teachers"]["b"] = "CompVis/stable-diffusion-v1-4"
    data = card_data(validate_recipe(raw), None)
    assert data.license == "creativeml-openrail-m"
    assert data.base_model == ["CompVis/stable-diffusion-v1-4"]
    assert not data.eval_results


def _metrics(folder: Path, fingerprint: str | None) -> Path:
    fid = {"value": 12.5, "n": 500, "detail": "seeds 0..499", "unavailable": None}
    row = {"name": "student", "source": "", "metrics": {"fid": fid}}
    if fingerprint is not None:
        row["fingerprint"] = fingerprint
    path = folder / "metrics.json"
    table = "| model | FID ↓ |\n|---|---|\n| student | 12.5 |"
    path.write_text(json.dumps({"settings": {"prompts": "fashion"}, "rows": [row], "table": table}))
    return path


@pytest.mark.parametrize("fingerprint", ["0" * 64, None], ids=["other weights", "unrecorded"])
def test_metrics_of_other_weights_never_reach_the_model_card(
    finished_run: Path, tmp_path: Path, fingerprint
) -> None:
    out = tmp_path / "exported"
    metrics = _metrics(tmp_path, fingerprint)
    assert main(["export", str(finished_run), str(out), "--metrics", str(metrics)]) == 0
    card = (out / "README.md").read_text()
    assert "12.5" not in card
    assert "Not evaluated: the metrics given" in card
    assert pipeline_fingerprint(finished_run / "student_pipeline")[:12] in card


def test_export_refuses_unfinished_runs_and_non_empty_outputs(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    assert main(["export", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert main(["export", str(finished_run), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "x").read_text() == "keep me"
    assert (
        main(
            [
                "export",
                str(finished_run),
                str(tmp_path / "h"),
                "--format",
                "onnx",
                "--dtype",
                "fp16",
            ]
        )
        == 2
    )
    assert "ONNX export is fp32" in capsys.readouterr().err


# Measured on the offline teacher (25 PNDM steps, 3 seeds): max |torch − ONNX Runtime| 0.00085 of
# 255 levels, mean 0.00005. The bound leaves 10x for other CPUs' kernels; a wrong VAE scale or a
# dropped guidance branch moves pixels by whole levels.
ONNX_PIXEL_TOLERANCE = 0.01  # of 255


@pytest.mark.e2e  # ~30 s: four dynamo exports
def test_onnx_export_runs_in_onnx_runtime_and_matches_torch(
    finished_run: Path, tmp_path: Path
) -> None:
    """`distill export --format onnx`: the folder loads in diffusers' OnnxStableDiffusionPipeline
    and, from the same prompt and initial latents, gives torch's image within the tolerance."""
    from diffusers import StableDiffusionPipeline

    from distill.onnx_export import load_onnx_pipeline, onnx_image_size

    # A VAE scaled otherwise than SD v1's 0.18215 (the offline world's is 0.84): the ONNX
    # pipeline's hard-coded factor must be corrected for in the export.
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    vae_config = run / "student_pipeline" / "vae" / "config.json"
    vae_config.write_text(json.dumps(json.loads(vae_config.read_text()) | {"scaling_factor": 0.5}))
    out = tmp_path / "onnx"
    assert main(["export", str(run), str(out), "--format", "onnx"]) == 0
    assert (out / "unet" / "model.onnx").is_file() and not list(out.rglob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert "OnnxStableDiffusionPipeline.from_pretrained(" in card
    assert "height=64, width=64" in card  # the 8x8-latent UNet, as the ONNX pipeline counts
    onnx = load_onnx_pipeline(out)
    reference = StableDiffusionPipeline.from_pretrained(run / "student_pipeline")
    size = reference.unet.config.sample_size
    for pipeline in (onnx, reference):
        pipeline.set_progress_bar_config(disable=True)
    for seed in (0, 1):
        latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
        common = {"num_inference_steps": 4, "output_type": "np"}
        ours = reference("a photo of a bag", latents=latents, **common).images
        pixels = onnx_image_size(size)
        theirs = onnx(
            "a photo of a bag", latents=latents.numpy(), height=pixels, width=pixels, **common
        ).images
        assert ours.shape == theirs.shape
        assert 255 * abs(ours - theirs).max() < ONNX_PIXEL_TOLERANCE
