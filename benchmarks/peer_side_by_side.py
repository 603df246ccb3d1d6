"""`distill run` beside BK-SDM's own training script, on this machine, same work per step.

    git clone https://github.com/Nota-NetsPresso/BK-SDM /tmp/BK-SDM   # its code stays there
    .venv/bin/python benchmarks/peer_side_by_side.py \\
        --peer-script /tmp/BK-SDM/src/kd_train_text_to_image.py --work /tmp/sbs

Both train the `base` student (BK-SDM-Base: SD v1.4's UNet with layers_per_block=1, initialized
from the teacher) on one random-weight SD v1.4-shaped pipeline (seeded; weights do not change
the cost) and one imagefolder of 16 captioned 512 px images, at batch 1, gradient checkpointing,
bf16 mixed precision, with BK-SDM's losses (task + output KD + feature KD over the 8 block
outputs, weights 1.0), AdamW at lr 5e-5, max grad norm 1.0:

- `peer`: BK-SDM's script as shipped (EMA off, its default), `--mixed_precision bf16`,
  `--num_valid_images 0` (its step-0 validation would otherwise draw 4 images at 512 px, minutes
  on a CPU, before the first timed step);
- `ours`: `distill run bk_sdm_base` with the recipe's defaults (EMA on), the same data and
  teacher, batch 1 and no validation grids;
- `ours-no-ema`: the same with `training.ema.enabled=false`;
- `ours-glibc-malloc`: `ours` with glibc's malloc defaults (`SD_DISTILL_MALLOC=system`; the CLI
  otherwise keeps freed memory for reuse, `core.host_allocator`).

Each run is a separate process, one after the other. Seconds per step: the clock between the
training progress bar's updates (each script's own tqdm bar, read from its stderr), median over
steps 3..N (the first two warm up). Peak RSS: the process's own high-water mark (`wait4`), the
whole run (loading, training, saving). The cache/VAE encode of our first run is done before its
bar starts, as BK-SDM's would be on every step: ours encodes the 16 images once (cached), the
peer encodes every step's image through the VAE inside its step.

Measure on a quiet machine: another process on the cores slows both many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GB = 1e9
RESOLUTION = 512
IMAGES = 16
CAPTIONS = ("a red car on a street", "a bowl of fruit on a table", "a dog in a field")
# tqdm's "n/total [" (the bar's counter); the bar's description picks the training bar.
COUNTER = re.compile(rb"(\d+)/(\d+) \[")


# BK-SDM's script was written for accelerate 0.16. Today's Accelerator takes `project_dir`, not
# `logging_dir`, and `get_tracker` raises for a tracker not in use where 0.16 returned a no-op.
# The shim restores those two, then runs the script unchanged as __main__.
PEER_SHIM = """
import runpy, sys
import accelerate
init = accelerate.Accelerator.__init__
def renamed(self, *args, logging_dir=None, **kwargs):
    init(self, *args, project_dir=logging_dir, **kwargs)
accelerate.Accelerator.__init__ = renamed
get_tracker = accelerate.Accelerator.get_tracker
def tracker_or_none(self, name, *args, **kwargs):
    try:
        return get_tracker(self, name, *args, **kwargs)
    except ValueError:
        return None
accelerate.Accelerator.get_tracker = tracker_or_none
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, script.rsplit("/", 1)[0])
runpy.run_path(script, run_name="__main__")
"""


def build_world(work: Path) -> tuple[Path, Path]:
    """The random-weight SD v1.4-shaped pipeline folder and the imagefolder, built once."""
    pipeline_dir, images_dir = work / "sd-v1-4-random", work / "images"
    if not (pipeline_dir / "model_index.json").exists():
        import torch
        from few_step_latency import random_sd_pipeline

        from core.families import builtin_config

        pipeline = random_sd_pipeline(torch.float32, builtin_config("sd-v1-4"))  # the teacher
        pipeline.save_pretrained(pipeline_dir, safe_serialization=True)
    if not (images_dir / "metadata.jsonl").exists():
        import numpy as np
        from PIL import Image

        images_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for index in range(IMAGES):
            pixels = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images_dir / f"{index:03d}.png")
            rows.append({"file_name": f"{index:03d}.png", "text": CAPTIONS[index % 3]})
        (images_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pipeline_dir, images_dir


def peer_command(
    script: Path, pipeline_dir: Path, images_dir: Path, out: Path, steps: int
) -> list[str]:
    config_dir = script.parent / "unet_config"
    return [
        sys.executable, "-c", PEER_SHIM, str(script),
        "--pretrained_model_name_or_path", str(pipeline_dir),
        "--train_data_dir", str(images_dir),
        "--resolution", str(RESOLUTION), "--center_crop",
        "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--gradient_checkpointing", "--mixed_precision", "bf16",
        "--learning_rate", "5e-05", "--max_grad_norm", "1",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--seed", "1234",
        "--checkpointing_steps", "100000", "--num_valid_images", "0",
        "--lambda_sd", "1.0", "--lambda_kd_output", "1.0", "--lambda_kd_feat", "1.0",
        "--use_copy_weight_from_teacher",
        "--unet_config_path", str(config_dir), "--unet_config_name", "bk_base",
        "--output_dir", str(out),
    ]  # fmt: skip


# Our named runs: (recipe overrides, environment added to the run's).
OUR_RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "ours": ([], {}),
    "ours-no-ema": (["training.ema.enabled=false"], {}),
    "ours-glibc-malloc": ([], {"SD_DISTILL_MALLOC": "system"}),
}


def ours_command(
    pipeline_dir: Path, images_dir: Path, out: Path, steps: int, extra: Sequence[str]
) -> list[str]:
    return [
        sys.executable, "-m", "cli", "run", "--overwrite", "bk_sdm_base",
        f"output_dir={out}",
        f"teachers.sd-v1-4={pipeline_dir}",
        f"data.source={images_dir}",
        f"data.cache_dir={out.parent / 'cache'}",
        "data.encode_batch_size=4",
        "training.validation_prompts=[]",
        "training.log_every=1",
        f"stages.0.steps={steps}",
        "stages.0.batch_size=1",
        "stages.0.gradient_accumulation=1",
        *extra,
    ]  # fmt: skip


def timed_run(
    command: list[str], bar: bytes, log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `command` (with `env` added to this process's environment); the times at which its
    training bar (`bar` in the line) advanced, and the process's peak RSS."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_MININTERVAL": "0",
        **(env or {}),
    }
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    ticks: dict[int, float] = {}

    def read() -> None:
        with log.open("wb") as sink:
            buffer = b""
            while chunk := process.stdout.read1(4096):
                sink.write(chunk)
                buffer += chunk
                *pieces, buffer = re.split(rb"[\r\n]", buffer)
                for piece in pieces:
                    match = COUNTER.search(piece)
                    if bar in piece and match and int(match[1]) not in ticks:
                        ticks[int(match[1])] = time.perf_counter()

    rss: list[tuple[float, int, float]] = []  # (seconds, steps done, RSS GB) every 0.25 s

    def sample() -> None:
        status = Path(f"/proc/{process.pid}/status")
        while process.returncode is None:
            try:
                kib = next(
                    int(line.split()[1]) for line in status.open() if line.startswith("VmRSS")
                )
            except (OSError, StopIteration):
                return
            rss.append((time.perf_counter() - started, max(ticks, default=0), kib * 1024 / GB))
            time.sleep(0.25)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    threading.Thread(target=sample, daemon=True).start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    if process.returncode != 0:
        raise SystemExit(f"{command[1]} exited {process.returncode}; its output: {log}")
    steps = [ticks[n] - ticks[n - 1] for n in sorted(ticks) if n - 1 in ticks and n >= 3]
    return {
        "s_per_step_median": statistics.median(steps) if steps else None,
        "step_seconds": [round(s, 2) for s in steps],
        "peak_rss_gb": usage.ru_maxrss * 1024 / GB,
        # The high-water mark while training (between the first and the last bar update), and
        # when the whole run reached it: a peak outside the steps is load or save, not training.
        "peak_rss_gb_steps": max(
            (r for _, n, r in rss if 0 < n < max(ticks, default=0)), default=None
        ),
        "peak_at": max(rss, key=lambda sample: sample[2], default=None),
        "wall_s": time.perf_counter() - started,
        "log": str(log),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-script", type=Path, help="BK-SDM's src/kd_train_text_to_image.py")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--runs",
        default="peer,ours,ours-no-ema",
        help="comma-separated, in order: peer, ours, ours-no-ema, ours-glibc-malloc (glibc's "
        "malloc defaults, core.host_allocator), or ours:KEY=VALUE[;KEY=VALUE]",
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    pipeline_dir, images_dir = build_world(args.work)
    results: dict[str, Any] = {"load_average_start": os.getloadavg()}
    for name in args.runs.split(","):
        out = args.work / "runs" / name.replace(":", "_").replace("=", "-").replace(";", "_")
        log = args.work / f"{out.name}.log"
        if name == "peer":
            if args.peer_script is None:
                raise SystemExit("--peer-script is needed for the peer run")
            command = peer_command(args.peer_script, pipeline_dir, images_dir, out, args.steps)
            bar, env = b"Steps", {}
        else:
            extra, env = OUR_RUNS.get(name) or (name.split(":", 1)[1].split(";"), {})
            command = ours_command(pipeline_dir, images_dir, out, args.steps, extra)
            bar = b"stage 1/1"
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = timed_run(command, bar, log, env)
        shutil.rmtree(out, ignore_errors=True)  # ~14 GB each: checkpoint, stage UNet, pipeline
        print(json.dumps({name: results[name]}), flush=True)
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
