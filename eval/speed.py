"""What the student saves: parameters, GFLOPs, UNet latency per step and whole-pipeline latency.

Latency is wall time on the current device, under `torch.inference_mode`, after warm-up calls, as
the median of `repeats` timed calls (CUDA is synchronized around each). Teacher and student get
identical inputs: the same seeded latents and text embeddings for the UNet, the same prompt and
seed for the pipeline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from eval.generate import reads_guidance_embedding, using_scheduler
from eval.results import MetricResult
from students.cost import count_params, dummy_unet_inputs, forward_gflops


def median_latency(
    call: Callable[[], Any], device: torch.device, warmup: int, repeats: int
) -> float:
    """Median wall seconds of `call()` over `repeats` runs after `warmup` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            synchronize()
            start = time.perf_counter()
            call()
            synchronize()
            if run >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_size(unet: UNet2DConditionModel) -> dict[str, MetricResult]:
    """UNet parameters and GFLOPs of one forward (batch 1, native latent size)."""
    size = unet.config.sample_size
    return {
        "params": MetricResult(value=float(count_params(unet)), detail="UNet parameters"),
        "gflops": MetricResult(
            value=forward_gflops(unet, batch_size=1),
            detail=f"one UNet forward, batch 1, {size}x{size} latents (torch.utils.flop_counter)",
        ),
    }


def uses_classifier_free_guidance(pipeline: DiffusionPipeline, settings: dict[str, Any]) -> bool:
    """Whether sampling runs the UNet twice per step (conditional and unconditional): guidance
    above 1, unless the UNet reads the guidance through an embedding (a few-step student)."""
    return settings["guidance_scale"] > 1 and not reads_guidance_embedding(pipeline)


def unet_evaluations(pipeline: DiffusionPipeline, settings: dict[str, Any]) -> MetricResult:
    """UNet evaluations per image: steps × 2 with classifier-free guidance, × 1 without (the
    number that, with the UNet's size, sets latency on any hardware)."""
    steps = settings["num_inference_steps"]
    if uses_classifier_free_guidance(pipeline, settings):
        how = "2 each: classifier-free guidance (conditional and unconditional)"
        return MetricResult(2 * steps, None, f"{steps} steps × {how}")
    embedded = reads_guidance_embedding(pipeline)
    how = "guidance through the embedding, one pass" if embedded else "no guidance, one pass"
    return MetricResult(steps, None, f"{steps} steps × 1 ({how})")


def unet_step_latency(
    unet: UNet2DConditionModel,
    *,
    batch_size: int = 2,
    sample_size: int | None = None,
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 5,
) -> MetricResult:
    """Seconds per UNet forward = one denoising step. `batch_size` 2 is one prompt with
    classifier-free guidance (conditional + unconditional)."""
    cuda_devices = [unet.device.index or 0] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)  # same inputs for teacher and student
        inputs = dummy_unet_inputs(unet, batch_size, sample_size)
    seconds = median_latency(lambda: unet(**inputs), unet.device, warmup, repeats)
    size = sample_size or unet.config.sample_size
    return MetricResult(
        value=seconds,
        n=repeats,
        detail=f"median of {repeats} after {warmup} warm-up; batch {batch_size}, {size}x{size} "
        f"latents, {unet.device.type} {str(unet.dtype).removeprefix('torch.')}",
    )


def pipeline_latency(
    pipeline: DiffusionPipeline,
    prompt: str,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    scheduler: str = "pndm",
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 3,
) -> MetricResult:
    """Seconds for one image through the whole pipeline: text encoder, all steps, VAE decode."""
    pipeline.set_progress_bar_config(disable=True)

    def generate_one() -> None:
        pipeline(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        )

    with using_scheduler(pipeline, scheduler):
        seconds = median_latency(generate_one, pipeline.device, warmup, repeats)
    return MetricResult(
        value=seconds,
        n=repeats,
        detail=f"median of {repeats} after {warmup} warm-up; 1 image, {num_inference_steps} "
        f"{scheduler} steps, guidance {guidance_scale}, {pipeline.device.type}",
    )
