"""The SDXL and SD 2.x-v twins of the offline world, chained end to end at toy size: the shipped
teacher recipe trains, the shipped student recipe distills through the same engine as SD v1,
`distill eval` scores teacher against student, and the export loads in plain diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main
from testkit.tiny_world import TOY_TEACHER_OVERRIDES

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

pytestmark = pytest.mark.e2e  # long end-to-end chains: `make test-e2e`


LOAD = """
import json, sys
import diffusers
pipe = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe("a photo of a bag", num_inference_steps=2, output_type="np").images[0]
print(json.dumps({
    "class": type(pipe).__name__,
    "prediction_type": pipe.scheduler.config.prediction_type,
    "depth": [len(b.attentions[0].transformer_blocks) if hasattr(b, "attentions") else 0
              for b in pipe.unet.down_blocks],
    "shape": list(image.shape),
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("distill", "students", "core")),
}))
"""

WORLDS = {
    # world: (teacher recipe, student recipe, stages, pipeline class, prediction type, depth)
    "sdxl": (
        "fashion_sdxl_teacher.yaml",
        "fashion_sdxl_student.yaml",
        1,
        "StableDiffusionXLPipeline",
        "epsilon",
        [0, 1, 1],  # the deepest stage's 2 transformer layers cut to 1 (KOALA's knob)
    ),
    "sd2v": (
        "fashion_sd2v_teacher.yaml",
        "fashion_sd2v_student.yaml",
        3,
        "StableDiffusionPipeline",
        "v_prediction",
        [1, 1, 0],
    ),
}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_world_trains_distills_evaluates_and_exports(world: str, tmp_path: Path, capsys) -> None:
    teacher_recipe, student_recipe, stages, pipeline_class, prediction, depth = WORLDS[world]
    teachers = tmp_path / "teachers"
    command = ["run", str(RECIPES / teacher_recipe), f"output_dir={teachers}"]
    command += TOY_TEACHER_OVERRIDES
    assert main([*command, "--no-progress"]) == 0

    run = tmp_path / "run"
    overrides = [
        f"teachers.a={teachers / 'teacher_a'}",
        f"teachers.b={teachers / 'teacher_b'}",
        f"output_dir={run}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_samples=16",
        "training.validation_steps=2",
        *(f"stages.{i}.{key}" for i in range(stages) for key in ("steps=3", "batch_size=4")),
    ]
    assert main(["run", str(RECIPES / student_recipe), *overrides, "--no-progress"]) == 0
    log = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    terms = {key for row in log for key in row}
    assert {"loss/task", "loss/output_kd"} <= terms
    if world == "sdxl":  # KOALA's self-attention pairs, each logged on its own
        assert any(key.startswith("loss/feature_kd/") and "attn1" in key for key in terms)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dress\na photo of a bag\n")
    evaluation = tmp_path / "eval"
    command = ["eval", "--model", str(run / "student_pipeline")]
    command += ["--teacher", str(teachers / "teacher_b"), "--prompts", str(prompts)]
    command += ["--num-images", "2", "--steps", "2", "--is-splits", "1", "--speed-repeats", "1"]
    command += ["--bootstrap", "0", "--out", str(evaluation), "--no-progress"]
    assert main(command) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert {row["name"] for row in metrics["rows"]} == {"student", "teacher"}
    assert metrics["settings"]["height"] == 32

    export = tmp_path / "export"
    metrics_file = str(evaluation / "metrics.json")
    assert main(["export", str(run), str(export), "--metrics", metrics_file]) == 0
    capsys.readouterr()
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(export)], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == pipeline_class
    assert loaded["prediction_type"] == prediction
    assert loaded["depth"] == depth
    assert loaded["shape"] == [32, 32, 3]
    assert loaded["modules"] == []  # plain diffusers: nothing of ours is imported
