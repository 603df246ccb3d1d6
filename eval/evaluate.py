"""`evaluate(...)`: a student and its teacher under one protocol, from images to report.

Both models generate the same prompts with the same seeds (prompt i, seed `seed + i`); FID, CLIP
and IS are computed on the same n images for both; size and speed are measured on the same inputs.
Every number in `out_dir/metrics.json` and `out_dir/report.md` states its n and seeds, and a metric
that cannot run here says why.

    out_dir/images/teacher/000000.png ...   (+ manifest.json; reruns resume)
    out_dir/images/student/000000.png ...
    out_dir/metrics.json, out_dir/report.md, out_dir/comparison_grid.png
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from distill.errors import UserInputError
from distill.pipelines import load_sd_pipeline
from eval.clip_score import ClipBackend, clip_score, load_clip_backend
from eval.fid import compute_fid
from eval.generate import GeneratedImages, generate_images
from eval.inception_score import inception_score
from eval.prompts import load_prompts
from eval.protocols import EvalProtocol, PublishedResult
from eval.report import GridInfo, ReportRow, make_comparison_grid, write_report
from eval.results import MetricResult, MetricUnavailable
from eval.speed import model_size, pipeline_latency, unet_step_latency

GRID_COLUMNS = 8


def load_pipeline(
    model: str | Path | StableDiffusionPipeline, device: torch.device, dtype: torch.dtype
) -> StableDiffusionPipeline:
    """A pipeline object as it is, or a folder / hub id loaded without the safety checker."""
    if isinstance(model, StableDiffusionPipeline):
        return model
    return load_sd_pipeline(model, dtype=dtype).to(device)


def evaluate(
    model_dir: str | Path | StableDiffusionPipeline,
    teacher_dir: str | Path | StableDiffusionPipeline | None,
    prompts: str | Path | Sequence[str],
    num_images: int | None,
    reference: str | Path | Any | None,
    out_dir: str | Path,
    clip_model: str | ClipBackend | None = None,
    seed: int = 0,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    output_size: int | None = None,
    scheduler: str = "pndm",
    batch_size: int = 4,
    reference_resize: int | None = None,
    image_column: str = "image",
    inception_score_splits: int = 10,
    inception_weights: str | Path | None = None,
    allow_download: bool = True,
    speed_warmup: int = 1,
    speed_repeats: int = 5,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    published: Sequence[PublishedResult] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the student at `model_dir` against the teacher at `teacher_dir` (None: the student
    alone); returns what `metrics.json` holds.

    `prompts` is a `load_prompts` spec (`coco30k`, `fashion`, a text file) or a list; `num_images`
    images per model (None: one per prompt). `reference` is the FID reference (folder, dataset,
    `.npz`; None: FID unavailable). `clip_model` is a CLIP spec or backend (None: CLIP
    unavailable). Device: CUDA when present; dtype: fp16 on CUDA (as BK-SDM), else fp32.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    prompt_list = _prompt_list(prompts, num_images, seed)
    if len(prompt_list) < inception_score_splits:
        raise UserInputError(
            f"{len(prompt_list)} images cannot fill {inception_score_splits} Inception Score splits"
        )
    seeds_text = f"seeds {seed}..{seed + len(prompt_list) - 1} (prompt i: seed {seed}+i)"
    out_dir = Path(out_dir)
    generation = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "output_size": output_size,
        "scheduler": scheduler,
    }
    models = [("teacher", teacher_dir)] if teacher_dir is not None else []
    models.append(("student", model_dir))

    score_fid = partial(
        compute_fid,
        reference=reference,
        image_column=image_column,
        reference_resize=reference_resize,
        weights_path=inception_weights,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
    )
    fid_unavailable = None if reference is not None else MetricResult.missing("no FID reference")
    clip_backend, clip_unavailable = _load_clip_once(clip_model, device)
    score_clip = partial(clip_score, clip_model=clip_backend, device=device, progress=progress)
    score_is = partial(
        inception_score,
        weights_path=inception_weights,
        allow_download=allow_download,
        splits=inception_score_splits,
        seed=seed,
        device=device,
        progress=progress,
    )

    rows: list[ReportRow] = []
    samples: dict[str, GeneratedImages] = {}
    for name, model in models:
        pipeline = load_pipeline(model, device, dtype)
        images = generate_images(
            pipeline,
            prompt_list,
            out_dir / "images" / name,
            base_seed=seed,
            batch_size=batch_size,
            progress=progress,
            **generation,
        )
        samples[name] = images
        quality = {
            "fid": fid_unavailable or score_fid(images.paths),
            "clip": clip_unavailable or score_clip(images.paths, images.prompts),
            "is": score_is(images.paths),
        }
        metrics = {key: _with_seeds(result, seeds_text) for key, result in quality.items()}
        metrics.update(model_size(pipeline.unet))
        metrics.update(_latencies(pipeline, images, seed, speed_warmup, speed_repeats))
        rows.append(ReportRow(name=name, metrics=metrics, source=_describe(model)))
        del pipeline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows.extend(result.as_report_row() for result in published)
    resolved = samples["student"].settings  # the actual height and width, not None
    settings = {
        "prompts": str(prompts) if isinstance(prompts, str | Path) else "list",
        "num_images": len(prompt_list),
        "seed": seed,
        "reference": _describe(reference),
        "reference_resize": reference_resize,
        "clip_model": clip_backend.name if clip_backend is not None else clip_model,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        **generation,
        "height": resolved["height"],
        "width": resolved["width"],
    }
    return write_report(
        out_dir,
        rows,
        title="Teacher vs student" if teacher_dir is not None else "Student",
        settings=settings,
        grid=_grid(samples),
    )


def evaluate_protocol(
    protocol: EvalProtocol,
    model_dir: str | Path | StableDiffusionPipeline,
    teacher_dir: str | Path | StableDiffusionPipeline | None,
    reference: str | Path | Any | None,
    out_dir: str | Path,
    **overrides: Any,
) -> dict[str, Any]:
    """`evaluate` with every setting taken from `protocol` (e.g. BK-SDM's COCO-30K); `overrides`
    replace single settings (device, batch_size, a smaller num_images for a dry run, ...)."""
    kwargs = {**protocol.evaluate_kwargs(), **overrides}
    return evaluate(model_dir, teacher_dir, reference=reference, out_dir=out_dir, **kwargs)


def _prompt_list(
    prompts: str | Path | Sequence[str], num_images: int | None, seed: int
) -> list[str]:
    if isinstance(prompts, str | Path):
        return load_prompts(prompts, num_images, seed=seed)
    prompts = [p for p in prompts]
    if not prompts:
        raise UserInputError("no prompts given")
    count = num_images or len(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]


def _load_clip_once(
    clip_model: str | ClipBackend | None, device: torch.device
) -> tuple[ClipBackend | None, MetricResult | None]:
    """(backend, None), or (None, the "unavailable" result saying why none loaded). Loaded once
    for both models: BK-SDM's ViT-g-14 has 1.4B parameters."""
    if not isinstance(clip_model, str):
        return clip_model, None
    try:
        return load_clip_backend(clip_model, device), None
    except MetricUnavailable as reason:
        return None, MetricResult.missing(str(reason))


def _latencies(
    pipeline: StableDiffusionPipeline,
    images: GeneratedImages,
    seed: int,
    warmup: int,
    repeats: int,
) -> dict[str, MetricResult]:
    """UNet step and whole-pipeline latency at the generation settings (first prompt)."""
    settings = images.settings
    return {
        "unet_latency": unet_step_latency(
            pipeline.unet,
            batch_size=2 if settings["guidance_scale"] > 1 else 1,  # CFG doubles the batch
            sample_size=settings["height"] // pipeline.vae_scale_factor,
            seed=seed,
            warmup=warmup,
            repeats=repeats,
        ),
        "pipeline_latency": pipeline_latency(
            pipeline,
            images.prompts[0],
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings["height"],
            width=settings["width"],
            scheduler=settings["scheduler"],
            seed=seed,
            warmup=warmup,
            repeats=repeats,
        ),
    }


def _with_seeds(result: MetricResult, seeds_text: str) -> MetricResult:
    if not result.available:
        return result
    return dataclasses.replace(result, detail=f"{seeds_text}; {result.detail}")


def _grid(samples: dict[str, GeneratedImages]) -> GridInfo | None:
    """Teacher row above student row, first GRID_COLUMNS prompts (same seeds in both rows)."""
    if set(samples) != {"teacher", "student"}:
        return None
    count = min(GRID_COLUMNS, len(samples["student"].paths))
    rows = [
        [Image.open(path).convert("RGB") for path in samples[name].paths[:count]]
        for name in ("teacher", "student")
    ]
    prompts = samples["student"].prompts[:count]
    image = make_comparison_grid(rows[0], rows[1], [f"{i + 1}" for i in range(count)])
    return GridInfo(image=image, prompts=prompts, seeds=samples["student"].seeds[:count])


def _describe(thing: Any) -> str:
    if thing is None or isinstance(thing, str | Path):
        return str(thing)
    return getattr(thing, "name_or_path", None) or type(thing).__name__
