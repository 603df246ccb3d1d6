"""CPU latency per image, torch against ONNX Runtime, for one pipeline (fp32, batch 1).

    python benchmarks/onnx_latency.py --pipeline runs/fashion_teacher/teacher_b
    python benchmarks/onnx_latency.py --pipeline runs/fashion_small_sd/student_pipeline
    python benchmarks/onnx_latency.py --sd-v1-4-base --repeats 1   # random weights, 512 px

The pipeline is exported with `distill.onnx_export` into a temporary folder (its time is
printed) and loaded in diffusers' OnnxStableDiffusionPipeline. Both generate the same prompt
from the same initial latents with the same PNDM steps and guidance; after one warm-up image
each (a 1-step image at SD scale), the median of `--repeats` images is the latency. The
largest pixel difference between the two images is printed beside it (0-255 levels).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.families import load_pipeline
from distill.onnx_export import export_onnx, load_onnx_pipeline, onnx_image_size

PROMPT = "a photo of a bag"


def median_seconds(generate: Callable[[int], Any], steps: int, repeats: int, warmup: int) -> float:
    generate(warmup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", type=Path, help="a diffusers SD pipeline folder")
    source.add_argument(
        "--sd-v1-4-base", action="store_true", help="the base student at SD v1.4's shapes"
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.sd_v1_4_base:
        from few_step_latency import random_sd_pipeline  # beside this script

        pipeline, name, warmup = random_sd_pipeline(torch.float32), "SD v1.4 base student", 1
    else:
        pipeline = load_pipeline(args.pipeline, torch.float32)
        name, warmup = str(args.pipeline), args.steps
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    common = {"guidance_scale": args.guidance, "output_type": "np"}

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        export_onnx(pipeline, Path(folder) / "onnx", progress=False)
        export_seconds = time.perf_counter() - start
        onnx = load_onnx_pipeline(Path(folder) / "onnx")
        onnx.set_progress_bar_config(disable=True)
        pixels = onnx_image_size(size)

        def run_onnx(steps: int) -> np.ndarray:
            return onnx(
                PROMPT,
                num_inference_steps=steps,
                latents=latents.numpy(),
                height=pixels,
                width=pixels,
                **common,
            ).images

        def run_torch(steps: int) -> np.ndarray:
            with torch.no_grad():
                return pipeline(PROMPT, num_inference_steps=steps, latents=latents, **common).images

        torch_seconds = median_seconds(run_torch, args.steps, args.repeats, warmup)
        onnx_seconds = median_seconds(run_onnx, args.steps, args.repeats, warmup)
        difference = 255 * float(np.abs(run_torch(args.steps) - run_onnx(args.steps)).max())
    result = {
        "pipeline": name,
        "steps": args.steps,
        "torch_s_per_image": round(torch_seconds, 3),
        "onnx_s_per_image": round(onnx_seconds, 3),
        "speedup": round(torch_seconds / onnx_seconds, 2),
        "max_pixel_difference": round(difference, 5),
        "export_seconds": round(export_seconds, 1),
    }
    print(
        f"{name}: {args.steps} steps, batch 1, fp32, {torch.get_num_threads()} threads\n"
        f"  torch        {torch_seconds:.3f} s/image\n"
        f"  ONNX Runtime {onnx_seconds:.3f} s/image  ({result['speedup']}x)\n"
        f"  max |torch - ONNX| {difference:.5f} of 255 levels; export {export_seconds:.1f} s",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
