"""Resuming is exact and refuses to mix what a stage was trained from.

- kill -9 at any moment (during the cache build, during a checkpoint write, between steps), then
  `distill run` again, ends with the same weights, bit for bit, as a run never interrupted;
- a teacher retrained under a half-trained stage, or a changed dataset, stops the resume with one
  line and exit 2, unless `--restart-stage` trains that stage again from its start.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from cli import main
from distill.checkpoint import list_checkpoints
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")


def _write_recipe(raw: dict, path: Path) -> Path:
    path.write_text("# test recipe\n" + yaml.safe_dump(raw))
    return path


def _start(recipe: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "cli", "run", str(recipe), "--no-progress", *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, condition: Callable[[], bool], deadline: float) -> bool:
    """SIGKILL the run the moment `condition()` holds (polled every ~1 ms); False if it ended
    (or the deadline passed) first."""
    end = time.monotonic() + deadline
    while process.poll() is None and time.monotonic() < end:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    if process.poll() is None:
        process.kill()
        process.wait()
    return False


def _final_weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run / "stages" / stage / "unet" / "diffusion_pytorch_model.safetensors")


def _kill_points(run: Path, cache: Path, rng: random.Random) -> list[tuple[str, Callable]]:
    """Where the interrupted run is killed, in order: in the middle of encoding the cache, while
    a checkpoint folder is being written, and twice at a random moment in training."""
    checkpoints = run / "checkpoints"

    def encoding() -> bool:
        folders = list(cache.glob("latents-*"))
        return (
            bool(folders)
            and any(folders[0].glob("shard-*"))
            and not (folders[0] / "meta.json").exists()
        )

    def writing_checkpoint() -> bool:
        return checkpoints.is_dir() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir())

    def after(seconds: float) -> Callable[[], bool]:
        started = {}

        def condition() -> bool:
            if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
                return False  # count from the first checkpoint: training has begun
            started.setdefault("t", time.monotonic())
            return time.monotonic() - started["t"] > seconds

        return condition

    return [
        ("cache build", encoding),
        ("checkpoint write", writing_checkpoint),
        ("training", after(rng.uniform(0.0, 1.0))),
        ("training", after(rng.uniform(0.0, 1.0))),
    ]


@pytest.mark.e2e
def test_kill_9_at_any_moment_then_rerun_ends_bitwise_equal(teachers, tmp_path: Path) -> None:
    def recipe(name: str) -> dict:
        raw = tiny_recipe(tmp_path / name, teachers, checkpoint_every=1, keep_last=2)
        # Enough rows that encoding takes a while (shards of 64), and two stages of 6 steps.
        raw["data"] |= {"max_samples": 768, "encode_batch_size": 64}
        raw["stages"] = [raw["stages"][0] | {"steps": 5}, raw["stages"][2] | {"steps": 5}]
        return raw

    whole, parts = recipe("whole"), recipe("parts")
    DistillationTrainer(validate_recipe(whole), progress=False).train()  # never interrupted

    recipe_file = _write_recipe(parts, tmp_path / "parts.yaml")
    run, cache = Path(parts["output_dir"]), Path(parts["data"]["cache_dir"])
    killed = []
    for where, condition in _kill_points(run, cache, random.Random(7)):
        if _kill_when(_start(recipe_file), condition, deadline=120):
            killed.append(where)
    final = _start(recipe_file)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]

    assert "cache build" in killed and "training" in killed, killed
    for stage in ("01-denoise", "02-layer_matching"):
        expected, actual = (
            _final_weights(Path(whole["output_dir"]), stage),
            _final_weights(run, stage),
        )
        assert all(torch.equal(actual[key], expected[key]) for key in expected), stage
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10  # each step logged once, however often it was trained
    print("killed during:", killed)


def _interrupted(tmp_path: Path, teachers: dict) -> tuple[dict, Path]:
    raw = tiny_recipe(tmp_path, teachers, checkpoint_every=1)
    raw["stages"] = raw["stages"][2:]  # one stage, teacher b
    recipe = _write_recipe(raw, tmp_path / "recipe.yaml")
    from distill.recipe import load_recipe, resolve_paths
    from distill.trainer import DistillationTrainer

    loaded = resolve_paths(load_recipe(recipe), recipe.parent)
    DistillationTrainer(loaded, progress=False, stop_after_steps=2).train()
    return raw, recipe


def test_a_teacher_retrained_under_a_half_trained_stage_stops_the_resume(
    teachers, tmp_path: Path, capsys
) -> None:
    retrained = make_tiny_pipeline(tmp_path / "b", 2)
    raw, recipe = _interrupted(tmp_path, {"a": teachers["a"], "b": retrained})
    unet = UNet2DConditionModel.from_pretrained(retrained / "unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.mul_(0.5)
    unet.save_pretrained(retrained / "unet")  # same path, other weights
    capsys.readouterr()

    assert main(["run", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "stage 1 (layer_matching) cannot resume: its teacher fingerprint changed" in error
    assert "--restart-stage" in error

    assert main(["run", str(recipe), "--no-progress", "--restart-stage"]) == 0
    run = Path(raw["output_dir"])
    steps = [yaml.safe_load(line)["step"] for line in (run / "logs" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]  # trained again from step 1, each step logged once


def test_a_changed_dataset_under_a_half_trained_stage_stops_the_resume(
    teachers, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for index in range(8):
        Image.new("RGB", (32, 32), (index * 30, 0, 0)).save(folder / f"{index}.png")
        rows.append(f'{{"file_name": "{index}.png", "text": "a red square {index}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    raw = tiny_recipe(tmp_path, teachers, checkpoint_every=1)
    raw["data"] |= {"source": str(folder), "max_samples": None, "random_flip": False}
    raw["stages"] = raw["stages"][:1]
    recipe = _write_recipe(raw, tmp_path / "recipe.yaml")
    from distill.recipe import load_recipe, resolve_paths
    from distill.trainer import DistillationTrainer

    loaded = resolve_paths(load_recipe(recipe), recipe.parent)
    DistillationTrainer(loaded, progress=False, stop_after_steps=1).train()
    assert [c.state.step for c in list_checkpoints(Path(raw["output_dir"]) / "checkpoints")] == [1]

    Image.new("RGB", (32, 32), (0, 0, 255)).save(folder / "0.png")  # one image replaced
    capsys.readouterr()
    assert main(["run", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "stage 1 (denoise) cannot resume: its cache key changed" in error
