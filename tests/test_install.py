"""sd-distill installs like a library: `pip install .` (not editable) into a fresh venv, then
`distill student`, `distill recipes`, `distill run` of builtin recipes by name and `distill eval`
work from a folder outside the checkout: the recipes ship in the wheel, nothing reads the
checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from PIL import Image

from core import cpu_attention
from testkit.tiny_world import TOY_TEACHER_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.e2e
def test_a_fresh_venv_install_runs_student_run_and_eval_outside_the_checkout(
    tmp_path: Path,
) -> None:
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")
    # The tested set (constraints.txt) resolves from the pip cache `make` filled; not editable.
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            f"{ROOT}[offline-fid]",
        ],
        cwd=tmp_path,
        timeout=1800,
    )
    distill = str(environment / "bin" / "distill")
    work = tmp_path / "elsewhere"
    work.mkdir()
    located = _run([python, "-c", "import distill, recipes; print(distill.__file__)"], cwd=work)
    assert str(environment) in located and str(ROOT) not in located
    # The CPU attention kernel's C++ source ships in the wheel: the installed copy builds it
    # wherever the checkout's does.
    kernel = _run(
        [python, "-c", "from core import cpu_attention; print(cpu_attention.available())"], work
    )
    assert kernel.strip() == str(cpu_attention.available())

    student = json.loads(
        _run([distill, "student", "--teacher", "sd-v1-4", "--variant", "base", "--json"], work)
    )
    assert student["student_params"] == 579_384_964 and student["fresh_tensors"] == 0

    listed = _run([distill, "recipes"], work)
    assert "small_sd_v0" in listed and "compare/fashion_koala" in listed

    teachers = work / "teachers"
    _run(
        [
            distill,
            "run",
            "fashion_teacher",
            f"output_dir={teachers}",
            *TOY_TEACHER_OVERRIDES,
            "--no-progress",
        ],
        work,
    )
    _run(
        [
            distill,
            "run",
            "fashion_small_sd",
            f"teachers.a={teachers / 'teacher_a'}",
            f"teachers.b={teachers / 'teacher_b'}",
            f"output_dir={work / 'run'}",
            f"data.cache_dir={work / 'cache'}",
            "data.max_samples=16",
            "training.validation_steps=2",
            *(f"stages.{i}.{key}" for i in range(3) for key in ("steps=1", "batch_size=4")),
            "--no-progress",
        ],
        work,
    )
    reference = work / "reference"
    reference.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 100, 200 - 20 * i)).save(reference / f"{i}.png")
    (work / "prompts.txt").write_text("a photo of a cat\na photo of a dog\n")
    options = (
        "--num-images 4 --steps 2 --batch-size 4 --bootstrap 0 --speed-repeats 1 --is-splits 2"
    )
    _run(
        [distill, "eval", "--model", str(work / "run" / "student_pipeline"), "--teacher",
         str(teachers / "teacher_b"), "--prompts", str(work / "prompts.txt"), "--reference",
         str(reference), "--out", str(work / "eval"), "--no-progress", *options.split()],
        work,
    )  # fmt: skip
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert {row["name"] for row in metrics["rows"]} >= {"teacher", "student"}
    assert sys.executable != python
