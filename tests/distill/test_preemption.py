"""Preemption: SIGTERM (or SIGUSR1) in the middle of a stage finishes the step, writes its
checkpoint and exits 75; the rerun resumes from that step and ends bitwise equal to a run never
interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli import main
from distill.checkpoint import list_checkpoints
from distill.preemption import PREEMPTED_EXIT_CODE, StopRequests
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from testkit.tiny_world import tiny_recipe

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")

STEPS = 20


def _recipe(root: Path, teachers: dict[str, Path]) -> dict:
    # No periodic checkpoint before the end: the only one mid-stage is the preemption's.
    raw = tiny_recipe(root, teachers, checkpoint_every=100)
    raw["stages"] = [raw["stages"][2] | {"steps": STEPS}]  # layer matching from teacher b
    return raw


def _final_unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(
        run / "stages" / "01-layer_matching" / "unet" / "diffusion_pytorch_model.safetensors"
    )


def _logged_steps(run: Path) -> list[int]:
    metrics = run / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [yaml.safe_load(line)["step"] for line in metrics.read_text().splitlines() if line]


def test_sigterm_mid_stage_checkpoints_exits_75_and_the_rerun_is_bitwise_equal(
    teachers, tmp_path: Path
) -> None:
    whole = _recipe(tmp_path / "whole", teachers)
    DistillationTrainer(validate_recipe(whole), progress=False).train()  # never interrupted

    raw = _recipe(tmp_path / "parts", teachers)
    recipe = tmp_path / "parts.yaml"
    recipe.write_text("# test recipe\n" + yaml.safe_dump(raw))
    run = Path(raw["output_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "cli", "run", str(recipe), "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_logged_steps(run)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    error = stderr.decode().strip().splitlines()

    assert process.returncode == PREEMPTED_EXIT_CODE, stderr.decode()[-2000:]
    stopped_at = [c.state.step for c in list_checkpoints(run / "checkpoints")]
    assert len(stopped_at) == 1 and 2 <= stopped_at[0] < STEPS, stopped_at
    assert f"SIGTERM: stage 'layer_matching' stopped after step {stopped_at[0]}" in error[-1]
    assert _logged_steps(run) == list(range(1, stopped_at[0] + 1))  # the step in flight finished
    assert not (run / "student_pipeline").exists()

    assert main(["run", str(recipe), "--no-progress"]) == 0
    expected, actual = _final_unet(Path(whole["output_dir"])), _final_unet(run)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert _logged_steps(run) == list(range(1, STEPS + 1))


def test_a_stop_signal_sets_the_flag_only_while_entered() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequests(["USR1"]) as stops:
        assert not stops.requested
        signal.raise_signal(signal.SIGUSR1)  # would end the process without the handler
        assert stops.requested and stops.received is signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_an_unknown_stop_signal_is_one_line(teachers, tmp_path: Path, capsys) -> None:
    raw = _recipe(tmp_path, teachers)
    raw["training"]["stop_signals"] = ["SIGTERM", "SIGNOPE"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "training.stop_signals" in error
    assert "SIGNOPE" in error and not Path(raw["output_dir"]).exists()
