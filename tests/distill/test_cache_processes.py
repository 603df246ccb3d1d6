"""The latent cache built by several processes: the same bytes, and no timeout but our own.

Each process of a run encodes its own shards; nothing waits for the build in a collective call,
so a build far longer than the process group's timeout is fine (accelerate's 10 minutes would
end a 212k-image build on one GPU). Processes here are plain CPU processes: the build uses no
torch.distributed, and the runs use gloo through `accelerate launch`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill.data import PreprocessSpec, build_latent_cache, load_image_text_dataset
from distill.data.build import ProcessLayout
from distill.teacher import load_pipeline_components
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="gloo and fork on Linux"),
    pytest.mark.e2e,  # multi-process launches: `make test-e2e`
]
SCRIPT = Path(__file__).parent / "scripts" / "slow_cache_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "a", 1)


def _launch(recipe: Path, sleep: float, pg_timeout: float) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(SCRIPT), str(recipe), str(sleep), str(pg_timeout),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def _slow_recipe(tmp_path: Path, teacher: Path, **data) -> Path:
    raw = tiny_recipe(tmp_path, {"a": teacher})
    raw["data"] |= {"max_samples": 64, "encode_batch_size": 8, "rows_per_shard": 16, **data}
    raw["stages"] = [raw["stages"][0] | {"steps": 1, "batch_size": 2}]
    path = tmp_path / "recipe.yaml"
    path.write_text("# test\n" + yaml.safe_dump(raw))
    return path


def test_a_two_process_build_longer_than_the_process_group_timeout_finishes_the_same_cache(
    teacher, tmp_path
):
    # Rank 0's 4 VAE calls sleep 1 s each against a 2 s process-group timeout; the wait for the
    # other process's shards is under the default cache timeout (24 h), not a collective call.
    started = time.monotonic()
    result = _launch(_slow_recipe(tmp_path, teacher), sleep=1.0, pg_timeout=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started > 4
    assert (tmp_path / "run" / "student_pipeline" / "model_index.json").is_file()

    # The two processes built, byte for byte, what one process builds alone.
    components = load_pipeline_components(str(teacher))
    single = build_latent_cache(
        load_image_text_dataset("fashion-mnist", max_samples=64),
        vae=components.vae,
        conditioning=components.conditioning(encoders=False),
        preprocess=PreprocessSpec(32, random_flip=True),
        cache_root=tmp_path / "one",
        batch_size=8,
        rows_per_shard=16,
        layout=ProcessLayout(0, 1),
        progress=False,
    )
    double = tmp_path / "cache" / single.folder.name
    files = lambda folder: {  # noqa: E731
        p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(("done-", "."))
    }
    assert len(files(double)) == 4 + 2  # shards, empty caption, meta
    assert files(double) == files(single.folder)


def test_a_process_waiting_past_the_configured_cache_timeout_stops_with_one_line(teacher, tmp_path):
    # Rank 0 encodes slowly; rank 1, done early, waits 1 s at most (0.0003 h) for meta.json.
    recipe = _slow_recipe(tmp_path, teacher, cache_timeout_hours=0.0003)
    result = _launch(recipe, sleep=1.0, pg_timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("distill run: error")]
    assert errors and "waited 0.0003 h for" in errors[0] and "cache_timeout_hours" in errors[0]
