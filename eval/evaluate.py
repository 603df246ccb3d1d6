"""`evaluate(...)`: a student and its teacher under one protocol, from images to report.

generate → features → metrics. Both models generate the same prompts with the same seeds (one
`GenerationSettings`); the FID Inception network runs once over each row's images (pool3 for FID
and the fidelity FID, the classifier head's logits for IS, where it exists); then every metric of
the registry (`eval.metrics.registry`: built in, or registered by another package such as the
offline world's in-domain judge) scores the row from what it declared it needs. Every number in
`out_dir/metrics.json` and `out_dir/report.md` states its n and seeds, and a metric that cannot
run here is "n/a" with a footnote saying why.

The teacher's and the student's FIDs are resampled with the same draws (same n and seed), so the
difference of their FIDs gets an interval of its own: the report says whether the two differ at
this n.

    out_dir/images/teacher/000000.png ...   (+ manifest.json: fingerprint, settings; reruns resume,
    out_dir/images/student/000000.png ...    a changed model or setting regenerates)
    out_dir/metrics.json, out_dir/report.md, out_dir/comparison_grid.png
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from core.errors import UserInputError
from core.families import load_pipeline as load_family_pipeline
from core.fingerprints import pipeline_fingerprint, short
from core.image_grid import image_grid
from eval.fid import is_npz_reference, reference_images, reference_statistics
from eval.generate import (
    GeneratedImages,
    GenerationSettings,
    delete_generated_images,
    generate_images,
)
from eval.metrics.base import EvalContext, EvalOptions, Features, Metric, Need, Row
from eval.metrics.features import compute_features, load_feature_network
from eval.metrics.fid import difference_key
from eval.metrics.registry import metric_classes, report_columns
from eval.plots import fid_latency_plot
from eval.prompts import load_prompts
from eval.protocols import PublishedResult
from eval.report import GridInfo, ReportRow, write_report
from eval.results import MetricResult, MetricUnavailable

GRID_COLUMNS = 8


def load_pipeline(
    model: str | Path | DiffusionPipeline, device: torch.device, dtype: torch.dtype
) -> DiffusionPipeline:
    """A pipeline object as it is, or a folder / hub id loaded by its family (SD without the
    safety checker, SDXL as it is)."""
    if isinstance(model, DiffusionPipeline):
        return model
    return load_family_pipeline(model, dtype).to(device)


def evaluate(
    model_dir: str | Path | DiffusionPipeline,
    teacher_dir: str | Path | DiffusionPipeline | None,
    prompts: str | Path | Sequence[str],
    out_dir: str | Path,
    *,
    num_images: int | None = None,
    generation: GenerationSettings | None = None,
    options: EvalOptions | None = None,
    student_steps: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    published: Sequence[PublishedResult] = (),
    progress: bool = True,
    fresh_images: bool = False,
) -> dict[str, Any]:
    """Evaluate the student at `model_dir` against the teacher at `teacher_dir` (None: the student
    alone); returns what `metrics.json` holds.

    `prompts` is a `load_prompts` spec (`coco30k`, `fashion`, a text file) or a list; `num_images`
    images per model (None: one per prompt). `generation` fixes the images (sampler, steps,
    guidance, size, batch, seeding); `options` the metrics (FID reference, CLIP model, IS splits,
    bootstrap, latency repeats, a plugin metric's own settings). Device: CUDA when present;
    dtype: fp16 on CUDA (as BK-SDM), else fp32. `fresh_images` deletes previously generated
    images first (`distill eval --overwrite`).

    `student_steps` scores the student at each of these step counts (one row each, the same
    prompts and seeds; `generation.num_inference_steps` is then the teacher's); None: both at
    `generation.num_inference_steps`. Each row gives its UNet evaluations per image and pipeline
    latency, and `fid_latency.png` plots FID against latency, one point per row.
    """
    generation, options = generation or GenerationSettings(), options or EvalOptions()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    prompt_list = _prompt_list(prompts, num_images, generation.seed)
    _check(prompt_list, options)
    out_dir = Path(out_dir)
    # (row name, model, steps): the teacher once, the student at each of its step counts.
    several = student_steps is not None and len(student_steps) > 1
    runs = []
    if teacher_dir is not None:
        runs.append(("teacher", teacher_dir, generation.num_inference_steps))
    runs += [
        (f"student, {steps} step{'s' * (steps != 1)}" if several else "student", model_dir, steps)
        for steps in (student_steps or [generation.num_inference_steps])
    ]
    if fresh_images:
        for name, _, _ in runs:
            delete_generated_images(out_dir / "images" / _folder_name(name))
    if options.reference is not None and not is_npz_reference(options.reference):
        reference_images(options.reference, options.image_column)  # bad input fails first

    context = EvalContext(
        prompts=prompt_list,
        generation=generation,
        device=device,
        options=options,
        progress=progress,
        has_teacher=teacher_dir is not None,
    )
    metrics = _prepared_metrics(context)
    network = _feature_network(metrics, context)

    rows: list[ReportRow] = []
    scored: list[Row] = []
    samples: dict[str, GeneratedImages] = {}
    loaded: tuple[Any, DiffusionPipeline, str] | None = None
    for name, model, steps in runs:
        if loaded is None or loaded[0] is not model:  # one load for all of a model's rows
            loaded = None
            _free_memory(device)
            pipeline = load_pipeline(model, device, dtype)
            loaded = (model, pipeline, _folder_fingerprint(model) or pipeline_fingerprint(pipeline))
        _, pipeline, fingerprint = loaded
        images = generate_images(
            pipeline,
            prompt_list,
            out_dir / "images" / _folder_name(name),
            generation.with_steps(steps),
            fingerprint=fingerprint,
            progress=progress,
            desc=f"generate {name}",
        )
        samples[name] = images
        if progress:
            print(_generation_line(name, images), flush=True)
        row = Row(name, images, pipeline, _features(network, images, name, context))
        results: dict[str, MetricResult] = {}
        for metric, missing in metrics:
            found = missing if missing is not None else metric.score(row, context)
            if metric.per_image:
                found = {key: _with_seeds(value, context) for key, value in found.items()}
            results.update(found)
        row.pipeline = None
        scored.append(row)
        if name == "teacher":
            context.teacher = row
        rows.append(
            ReportRow(
                name=name,
                metrics=results,
                source=_describe(model),
                fingerprint=images.fingerprint,
                generation=_generation_info(images),
                model=name.split(",")[0],
                steps=steps,
            )
        )
    loaded = pipeline = None
    _free_memory(device)

    comparisons: dict[str, MetricResult] = {}
    for metric, missing in metrics:
        if missing is None:
            comparisons.update(metric.compare(scored, context))
    rows.extend(result.as_report_row() for result in published)
    resolved = samples[runs[-1][0]].settings  # the actual height and width, not None
    settings = {
        "prompts": str(prompts) if isinstance(prompts, str | Path) else "list",
        "num_images": len(prompt_list),
        **generation.to_dict(),
        "student_steps": list(student_steps) if student_steps else None,
        "height": resolved["height"],
        "width": resolved["width"],
        **_option_settings(options),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "bootstrap_seed": generation.seed,
    }
    for metric, _ in metrics:
        settings.update(metric.settings())
    notes = _notes(context, comparisons, rows)
    for metric, missing in metrics:
        if missing is None:
            notes.extend(metric.notes(context))
    notes.extend(_generation_note(rows))
    return write_report(
        out_dir,
        rows,
        title="Teacher vs student" if teacher_dir is not None else "Student",
        settings=settings,
        grid=_grid(samples),
        notes=notes,
        comparisons=comparisons,
        plot=fid_latency_plot(rows),
        columns=report_columns(),
    )


def _check(prompts: list[str], options: EvalOptions) -> None:
    if len(prompts) < options.inception_score_splits:
        raise UserInputError(
            f"{len(prompts)} images cannot fill {options.inception_score_splits} Inception Score "
            "splits"
        )
    if options.bootstrap_resamples < 0 or options.bootstrap_resamples == 1:
        raise UserInputError(
            f"bootstrap resamples must be 0 (none) or ≥ 2, got {options.bootstrap_resamples}"
        )


def _prepared_metrics(context: EvalContext) -> list[tuple[Metric, dict[str, MetricResult] | None]]:
    """Each metric that applies here, prepared once, with the n/a results of every one of its
    columns when it cannot run (and None when it can)."""
    prepared = []
    for metric_class in metric_classes():
        metric = metric_class()
        if not metric.applies(context):
            continue
        try:
            metric.prepare(context)
            prepared.append((metric, None))
        except MetricUnavailable as reason:
            prepared.append((metric, metric.unavailable(str(reason))))
    return prepared


def _feature_network(metrics: list[tuple[Metric, Any]], context: EvalContext) -> Any:
    """The Inception network, loaded once for the reference and every row, when some metric
    needs features; the reference's statistics go into `context`."""
    needs = {need for metric, missing in metrics if missing is None for need in metric.needs}
    if not needs & {Need.INCEPTION, Need.INCEPTION_LOGITS}:
        return None
    options = context.options
    if options.reference is None:  # said first: the fix is in the user's hands
        context.reference_missing = MetricResult.missing(
            "no FID reference given", detail="pass --reference"
        )
    try:
        network = load_feature_network(
            want_logits=Need.INCEPTION_LOGITS in needs,
            weights_path=options.inception_weights,
            cache_dir=options.cache_dir,
            allow_download=options.allow_download,
            device=context.device,
        )
    except MetricUnavailable as reason:
        context.reference_missing = context.reference_missing or MetricResult.missing(str(reason))
        return MetricResult.missing(str(reason))
    reference = options.reference
    if reference is not None and Need.REFERENCE in needs:
        context.reference = reference_statistics(
            reference,
            network.network,
            image_column=options.image_column,
            resize_to=options.reference_resize,
            weights_path=options.inception_weights,
            cache_dir=options.cache_dir,
            device=context.device,
            progress=context.progress,
            preprocessing=options.fid_preprocessing,
        )
    return network


def _features(network: Any, images: GeneratedImages, name: str, context: EvalContext) -> Features:
    if network is None:
        return Features(missing=MetricResult.missing("not needed"))
    if isinstance(network, MetricResult):
        return Features(missing=network)
    features = compute_features(
        images.paths,
        network,
        preprocessing=context.options.fid_preprocessing,
        device=context.device,
        progress=context.progress,
        desc=f"features {name}",
    )
    features.logits_missing = network.logits_missing
    return features


def _option_settings(options: EvalOptions) -> dict[str, Any]:
    """The metric settings as metrics.json records them (the reference described, not stored)."""
    return {
        "reference": _describe(options.reference),
        "reference_resize": options.reference_resize,
        "clip_model": options.clip_model
        if options.clip_model is None or isinstance(options.clip_model, str)
        else options.clip_model.name,
        "inception_score_splits": options.inception_score_splits,
        "fid_preprocessing": options.fid_preprocessing,
        "bootstrap_resamples": options.bootstrap_resamples,
        "max_bootstrap_images": options.max_bootstrap_images,
    }


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def _folder_name(name: str) -> str:
    """images/<this>: "student", or "student-4-steps" for a row at one of several step counts."""
    return name.replace(", ", "-").replace(" ", "-")


def _notes(
    context: EvalContext, comparisons: dict[str, MetricResult], rows: Sequence[ReportRow]
) -> list[str]:
    """Paragraphs under the table: sample sizes and seeds, the FID comparison."""
    n, seed = len(context.prompts), context.generation.seed
    resamples = context.options.bootstrap_resamples
    if context.generation.seeding == "one-generator":
        seeding = f"images in prompt order from one generator seeded {seed} (BK-SDM's seeding)"
    else:
        seeding = f"prompt i generated with seed {seed} + i (seeds {seed}..{seed + n - 1})"
    notes = [
        f"Every model: n = {n} images, {seeding}; the metrics of a row are computed on those "
        f"{n} images. "
        + (
            f"Intervals: 95%, from {resamples} half-samples of the images (seed {seed}; each "
            f"{n // 2} of the {n} without replacement), the same ones for every model."
            if resamples
            else "No bootstrap intervals were asked for."
        )
    ]
    for row in rows:
        difference = comparisons.get(difference_key(row.name))
        if difference is None or difference.interval is None:
            continue
        low, high = difference.interval
        verdict = (
            "the interval excludes 0: at this n the two FIDs differ"
            if low > 0 or high < 0
            else "the interval includes 0: at this n the two FIDs cannot be told apart"
        )
        label = "Student" if row.name == "student" else row.name[0].upper() + row.name[1:]
        notes.append(
            f"{label} − teacher FID: {difference.value:+.2f} [{low:+.2f}, {high:+.2f}] "
            f"(paired draws, n = {n}); {verdict}."
        )
    return notes


def _generation_note(rows: Sequence[ReportRow]) -> list[str]:
    generated = [
        f"{row.name} {row.generation['images_per_second']:.2f} img/s"
        for row in rows
        if row.generation.get("images_per_second")
    ]
    return [f"Generation this run: {', '.join(generated)}."] if generated else []


def _generation_line(name: str, images: GeneratedImages) -> str:
    total = len(images.paths)
    stale = f"; old images deleted: {images.stale}" if images.stale else ""
    rate = images.images_per_second
    if rate is None:
        return (
            f"generate {name}: all {total} images reused (fingerprint {short(images.fingerprint)})"
        )
    reused = total - len(images.newly_generated)
    return (
        f"generate {name}: {images.images_computed} images in {images.seconds:.1f} s, "
        f"{rate:.2f} img/s (batch {images.settings['batch_size']}; {reused} reused){stale}"
    )


def _generation_info(images: GeneratedImages) -> dict[str, Any]:
    rate = images.images_per_second
    return {
        "images_per_second": round(rate, 3) if rate is not None else None,
        "seconds": round(images.seconds, 2),
        "images_computed": images.images_computed,
        "newly_written": len(images.newly_generated),
        "stale": images.stale,
        "settings": images.settings,
    }


def _folder_fingerprint(model: str | Path | DiffusionPipeline) -> str | None:
    """The fingerprint of a local pipeline folder; None for a pipeline object or a hub id (their
    loaded components are hashed instead)."""
    if isinstance(model, str | Path) and Path(model).is_dir():
        try:
            return pipeline_fingerprint(model)
        except UserInputError:
            return None  # e.g. no .safetensors in it: hash what gets loaded
    return None


def _with_seeds(result: MetricResult, context: EvalContext) -> MetricResult:
    """A computed per-image metric's detail starts with the images' seeds."""
    if not result.available:
        return result
    return dataclasses.replace(result, detail=f"{context.seeds_text}; {result.detail}")


def _grid(samples: dict[str, GeneratedImages]) -> GridInfo | None:
    """The teacher's row above each student row, first GRID_COLUMNS prompts (same seeds)."""
    if "teacher" not in samples or len(samples) < 2:
        return None
    names = list(samples)  # the teacher first, as generated
    count = min(GRID_COLUMNS, len(samples[names[-1]].paths))
    rows = [
        [Image.open(path).convert("RGB") for path in samples[name].paths[:count]] for name in names
    ]
    image = image_grid(rows, row_labels=names, column_labels=[f"{i + 1}" for i in range(count)])
    last = samples[names[-1]]  # every row has the same prompts and seeds
    return GridInfo(image, last.prompts[:count], last.seeds[:count], tuple(names))


def _describe(thing: Any) -> str:
    if thing is None or isinstance(thing, str | Path):
        return str(thing)
    return getattr(thing, "name_or_path", None) or type(thing).__name__
