"""Export: a finished run becomes a plain diffusers pipeline folder with a model card."""

from __future__ import annotations

import json
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
    assert card.startswith("---\nlibrary_name: diffusers")
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
