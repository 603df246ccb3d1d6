"""Two CPU processes through `accelerate launch` (gloo) train what one process trains.

The randomness of a sample depends on its place in the sample stream, not on the process that
draws it, so 2 processes x batch 2 see exactly the samples, noise and timesteps of 1 process x
batch 4; DDP's gradient averaging then makes the two runs agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe


def _one_stage(tmp_path: Path, teachers: dict, name: str, batch_size: int) -> dict:
    raw = tiny_recipe(tmp_path, teachers)
    raw["output_dir"] = str(tmp_path / name)
    stage = raw["stages"][2] | {"steps": 2, "batch_size": batch_size, "gradient_accumulation": 1}
    raw["stages"] = [stage]
    raw["student"]["init_from"] = "a"
    return raw


@pytest.mark.e2e
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_process_run_matches_one_process_and_only_rank_0_writes(
    tmp_path: Path, monkeypatch, compiled: bool
) -> None:
    """Compiled: regional compile under DDP (dynamo's aot_eager backend, the graphs inductor
    would get), in both runs."""
    monkeypatch.setenv("SD_DISTILL_COMPILE_BACKEND", "aot_eager")
    teachers = {
        "a": make_tiny_pipeline(tmp_path / "a", 1),
        "b": make_tiny_pipeline(tmp_path / "b", 2),
    }
    single = _one_stage(tmp_path, teachers, "single", batch_size=4)
    single["training"]["compile"] = compiled
    DistillationTrainer(validate_recipe(single), progress=False).train()

    double = _one_stage(tmp_path, teachers, "double", batch_size=2)
    double["training"]["compile"] = compiled
    recipe_file = tmp_path / "double.yaml"
    recipe_file.write_text("# test\n" + yaml.safe_dump(double))
    # accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process (its simple launcher);
    # torchrun through `--multi_gpu` with ACCELERATE_USE_CPU=1 gives a real 2-process gloo group.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "cli",
            "run",
            str(recipe_file),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    records = {}
    for name in ("single", "double"):
        lines = (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines]
    assert len(records["double"]) == 2  # one line per step: only rank 0 wrote
    first_single, first_double = records["single"][0], records["double"][0]
    # Step 1: the same samples, noise and timesteps, split over two processes. Losses are
    # averaged over processes for the log; the gradient norm is of DDP's averaged gradient.
    for key in ("loss/task", "loss/output_kd", "loss/similarity", "grad_norm"):
        assert first_double[key] == pytest.approx(first_single[key], rel=1e-5), key
    assert (tmp_path / "double" / "student_pipeline" / "model_index.json").is_file()


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")


FSDP_SCRIPT = Path(__file__).parent / "scripts" / "fsdp_run.py"


def _torchrun(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, str(script), *arguments], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.e2e
def test_an_fsdp_sharded_run_resumes_bitwise_exact(tmp_path: Path) -> None:
    """FSDP2 on 2 CPU processes (gloo): torch's `fully_shard` runs on CPU, accelerate's plugin
    does not reach it there, so fsdp_run.py sets accelerate's FSDP mode as on GPUs. The student
    and its EMA are DTensor shards; checkpoints are gathered by every process (a rank-0-only
    gather would hang) and scattered back on resume."""
    teachers = {
        "a": make_tiny_pipeline(tmp_path / "a", 1),
        "b": make_tiny_pipeline(tmp_path / "b", 2),
    }
    runs = []
    for name, stops in (("whole", [""]), ("parts", [":2", ""])):
        raw = _one_stage(tmp_path, teachers, name, batch_size=2)
        raw["stages"][0]["steps"] = 4
        raw["training"]["checkpoint_every"] = 1
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text("# test\n" + yaml.safe_dump(raw))
        runs += [f"{recipe}{stop}" for stop in stops]
    result = _torchrun(FSDP_SCRIPT, *runs)  # one launch: whole, parts to step 2, parts resumed
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student and EMA sharded: True") == 2 * 3, result.stdout
    weights = {
        name: load_file(
            tmp_path
            / name
            / "stages"
            / "01-layer_matching"
            / "unet"
            / "diffusion_pytorch_model.safetensors"
        )
        for name in ("whole", "parts")
    }
    assert all(torch.equal(weights["whole"][k], weights["parts"][k]) for k in weights["whole"])


def test_deepspeed_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """DeepSpeed would step its engine on every micro-batch and hand back no gradient norm for
    the guard; the README offers DDP and FSDP only, and a DeepSpeed launch says so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import distill.stage
    from core.errors import UserInputError
    from distill.recipe import TrainingSpec

    launched = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    monkeypatch.setattr(distill.stage, "Accelerator", lambda **kwargs: launched)
    with pytest.raises(UserInputError, match="DeepSpeed is not supported"):
        distill.stage.training_accelerator(TrainingSpec(), tmp_path)
