"""`evaluate(...)`: a student and its teacher under one protocol, from images to report.

Both models generate the same prompts with the same seeds (prompt i, seed `seed + i`); every
metric is computed on the same n images for both; size and speed are measured on the same inputs.
Every number in `out_dir/metrics.json` and `out_dir/report.md` states its n and seeds, and a metric
that cannot run here is "n/a" with a footnote saying why.

    FID              against the reference, with a 95% interval from half-samples of the images
                     (`eval.fid_bootstrap`)
    fidelity FID     the student's images against the teacher's (same prompts and seeds), with a
                     paired interval (the same half-samples of both): how closely the student
                     copies its teacher
    CLIP, IS         CLIP score (a CLIP model must be given) and the Inception Score (needs
                     torch-fidelity's Inception with its classifier head)
    class accuracy,  in-domain, for Fashion-MNIST prompts: judged by the toolkit's own
    IS (in-domain)   Fashion-MNIST classifier (`eval.fashion_classifier`)

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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from core.errors import UserInputError
from core.families import load_pipeline as load_family_pipeline
from core.fingerprints import pipeline_fingerprint, short
from core.image_grid import image_grid
from eval.clip_score import ClipBackend, clip_score, load_clip_backend
from eval.fashion_classifier import ClassifierSettings, FashionClassifier, load_fashion_classifier
from eval.fid import (
    DEFAULT_MAX_BOOTSTRAP_IMAGES,
    FIDScore,
    image_features,
    is_npz_reference,
    reference_detail,
    reference_images,
    reference_statistics,
    score_against_reference,
    score_pair,
)
from eval.fid_bootstrap import DEFAULT_RESAMPLES, difference_interval
from eval.generate import GeneratedImages, delete_generated_images, generate_images
from eval.in_domain import class_accuracy, in_domain_inception_score, is_fashion_prompt_set
from eval.inception import load_inception
from eval.inception_score import inception_score
from eval.plots import fid_latency_plot
from eval.prompts import load_prompts
from eval.protocols import EvalProtocol, PublishedResult
from eval.report import GridInfo, ReportRow, write_report
from eval.results import MetricResult, MetricUnavailable
from eval.speed import (
    model_size,
    pipeline_latency,
    unet_evaluations,
    unet_step_latency,
    uses_classifier_free_guidance,
)

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
    num_images: int | None,
    reference: str | Path | Any | None,
    out_dir: str | Path,
    clip_model: str | ClipBackend | None = None,
    seed: int = 0,
    *,
    num_inference_steps: int = 25,
    student_steps: Sequence[int] | None = None,
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
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    max_bootstrap_images: int = DEFAULT_MAX_BOOTSTRAP_IMAGES,
    fashion_classifier: FashionClassifier | ClassifierSettings | None = None,
    fresh_images: bool = False,
) -> dict[str, Any]:
    """Evaluate the student at `model_dir` against the teacher at `teacher_dir` (None: the student
    alone); returns what `metrics.json` holds.

    `prompts` is a `load_prompts` spec (`coco30k`, `fashion`, a text file) or a list; `num_images`
    images per model (None: one per prompt). `reference` is the FID reference (folder, dataset,
    `.npz`; None: FID n/a). `clip_model` is a CLIP spec or backend (None: CLIP n/a). Device: CUDA
    when present; dtype: fp16 on CUDA (as BK-SDM), else fp32.

    Every FID gets a 95% interval from `bootstrap_resamples` resamples (seed `seed`; 0: none), on
    a seeded subsample when there are more than `max_bootstrap_images` images. When prompts are
    Fashion-MNIST captions, class accuracy and IS (in-domain) are judged by `fashion_classifier`
    (a trained one, or the settings of the cached one to load or train; None: the default).
    `fresh_images` deletes previously generated images first (`distill eval --overwrite`).

    `student_steps` scores the student at each of these step counts (one row each, the same
    prompts and seeds; `num_inference_steps` is then the teacher's); None: both at
    `num_inference_steps`. Each row gives its UNet evaluations per image and pipeline latency,
    and `fid_latency.png` plots FID against latency, one point per row.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    prompt_list = _prompt_list(prompts, num_images, seed)
    if len(prompt_list) < inception_score_splits:
        raise UserInputError(
            f"{len(prompt_list)} images cannot fill {inception_score_splits} Inception Score splits"
        )
    if bootstrap_resamples < 0 or bootstrap_resamples == 1:
        raise UserInputError(
            f"bootstrap resamples must be 0 (none) or ≥ 2, got {bootstrap_resamples}"
        )
    n = len(prompt_list)
    seeds_text = f"seeds {seed}..{seed + n - 1} (prompt i: seed {seed}+i)"
    out_dir = Path(out_dir)
    generation = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "output_size": output_size,
        "scheduler": scheduler,
    }
    # (row name, model, steps): the teacher once, the student at each of its step counts.
    several = student_steps is not None and len(student_steps) > 1
    runs = [("teacher", teacher_dir, num_inference_steps)] if teacher_dir is not None else []
    runs += [
        (f"student, {steps} step{'s' * (steps != 1)}" if several else "student", model_dir, steps)
        for steps in (student_steps or [num_inference_steps])
    ]
    if fresh_images:
        for name, _, _ in runs:
            delete_generated_images(out_dir / "images" / _folder_name(name))

    if reference is not None and not is_npz_reference(reference):
        reference_images(reference, image_column)  # bad input fails before any network loads
    inception, inception_missing = _load_inception_once(
        needed=reference is not None or teacher_dir is not None,
        weights_path=inception_weights,
        cache_dir=cache_dir,
        device=device,
    )
    reference_stats = None
    if reference is None:
        fid_missing = MetricResult.missing("no FID reference given", detail="pass --reference")
    elif inception is None:
        fid_missing = inception_missing
    else:
        fid_missing = None
        reference_stats = reference_statistics(
            reference,
            inception,
            image_column=image_column,
            resize_to=reference_resize,
            weights_path=inception_weights,
            cache_dir=cache_dir,
            device=device,
            progress=progress,
        )
    # One seed for every bootstrap: sets of the same n draw the same resamples, so the teacher's,
    # the student's and the fidelity FID's resampled values are paired.
    bootstrap = {
        "resamples": bootstrap_resamples,
        "seed": seed,
        "max_bootstrap_images": max_bootstrap_images,
    }
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
    judge = None
    if is_fashion_prompt_set(prompt_list):
        judge = _fashion_judge(fashion_classifier, cache_dir, device, progress)

    rows: list[ReportRow] = []
    samples: dict[str, GeneratedImages] = {}
    features: dict[str, torch.Tensor] = {}
    fid_scores: dict[str, FIDScore] = {}
    loaded: tuple[Any, DiffusionPipeline, str] | None = None
    for name, model, steps in runs:
        if loaded is None or loaded[0] is not model:  # one load for all of a model's rows
            loaded = pipeline = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pipeline = load_pipeline(model, device, dtype)
            fingerprint = _folder_fingerprint(model) or pipeline_fingerprint(pipeline)
            loaded = (model, pipeline, fingerprint)
        _, pipeline, fingerprint = loaded
        images = generate_images(
            pipeline,
            prompt_list,
            out_dir / "images" / _folder_name(name),
            base_seed=seed,
            batch_size=batch_size,
            fingerprint=fingerprint,
            progress=progress,
            desc=f"generate {name}",
            **(generation | {"num_inference_steps": steps}),
        )
        samples[name] = images
        if progress:
            print(_generation_line(name, images), flush=True)
        if inception is not None:
            features[name] = image_features(
                images.paths, inception, device=device, progress=progress, desc=f"features {name}"
            )
        fid = fid_missing
        if reference_stats is not None:
            fid_scores[name] = score_against_reference(features[name], reference_stats, **bootstrap)
            fid = fid_scores[name].metric(reference_detail(n, reference_stats, reference))
        quality = {
            "fid": fid,
            "clip": clip_unavailable or score_clip(images.paths, images.prompts),
            "is": score_is(images.paths),
        }
        if judge is not None:
            quality.update(_in_domain(judge, images, inception_score_splits, seed))
        metrics = {key: _with_seeds(result, seeds_text) for key, result in quality.items()}
        metrics.update(model_size(pipeline.unet))
        metrics["unet_evals"] = unet_evaluations(pipeline, images.settings)
        metrics.update(_latencies(pipeline, images, seed, speed_warmup, speed_repeats))
        rows.append(
            ReportRow(
                name=name,
                metrics=metrics,
                source=_describe(model),
                fingerprint=images.fingerprint,
                generation=_generation_info(images),
                model=name.split(",")[0],
                steps=steps,
            )
        )
    loaded = pipeline = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    comparisons: dict[str, MetricResult] = {}
    if teacher_dir is not None:
        for row in rows[1:]:
            row.metrics["fidelity_fid"] = _fidelity(
                features, row.name, inception_missing, bootstrap, seeds_text
            )
            if {"teacher", row.name} <= set(fid_scores):
                comparisons[_difference_key(row.name)] = _difference(fid_scores, row.name)
    rows.extend(result.as_report_row() for result in published)
    resolved = samples[runs[-1][0]].settings  # the actual height and width, not None
    settings = {
        "prompts": str(prompts) if isinstance(prompts, str | Path) else "list",
        "num_images": n,
        "seed": seed,
        "reference": _describe(reference),
        "reference_resize": reference_resize,
        "clip_model": clip_backend.name if clip_backend is not None else clip_model,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        **generation,
        "student_steps": list(student_steps) if student_steps else None,
        "height": resolved["height"],
        "width": resolved["width"],
        "batch_size": batch_size,
        "bootstrap_resamples": bootstrap_resamples,
        "bootstrap_seed": seed,
        "max_bootstrap_images": max_bootstrap_images,
        "fashion_classifier": _judge_setting(judge),
    }
    return write_report(
        out_dir,
        rows,
        title="Teacher vs student" if teacher_dir is not None else "Student",
        settings=settings,
        grid=_grid(samples),
        notes=_notes(n, seed, bootstrap_resamples, judge, comparisons, rows),
        comparisons=comparisons,
        plot=fid_latency_plot(rows),
    )


def evaluate_protocol(
    protocol: EvalProtocol,
    model_dir: str | Path | DiffusionPipeline,
    teacher_dir: str | Path | DiffusionPipeline | None,
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


def _load_inception_once(
    *,
    needed: bool,
    weights_path: str | Path | None,
    cache_dir: str | Path | None,
    device: torch.device,
) -> tuple[Any, MetricResult | None]:
    """(network, None), or (None, the n/a result saying why there is none). One network serves
    the reference, both models' features and the fidelity FID."""
    if not needed:
        return None, MetricResult.missing("not needed")
    try:
        return load_inception(weights_path=weights_path, cache_dir=cache_dir, device=device), None
    except MetricUnavailable as reason:
        return None, MetricResult.missing(str(reason))


def _fashion_judge(
    classifier: FashionClassifier | ClassifierSettings | None,
    cache_dir: str | Path | None,
    device: torch.device,
    progress: bool,
) -> FashionClassifier | MetricResult:
    """The in-domain judge, or the n/a result saying why there is none (no Fashion-MNIST data)."""
    if isinstance(classifier, FashionClassifier):
        return classifier
    try:
        return load_fashion_classifier(
            classifier, cache_dir=cache_dir, device=device, progress=progress
        )
    except UserInputError as reason:
        return MetricResult.missing(f"no Fashion-MNIST classifier: {reason}")


def _in_domain(
    judge: FashionClassifier | MetricResult, images: GeneratedImages, splits: int, seed: int
) -> dict[str, MetricResult]:
    """Class accuracy and IS (in-domain) of one model's images, or the judge's n/a for both."""
    if isinstance(judge, MetricResult):
        return {"class_accuracy": judge, "in_domain_is": judge}
    return {
        "class_accuracy": class_accuracy(images.paths, images.prompts, judge),
        "in_domain_is": in_domain_inception_score(images.paths, judge, splits=splits, seed=seed),
    }


def _judge_setting(judge: FashionClassifier | MetricResult | None) -> dict[str, Any] | None:
    if not isinstance(judge, FashionClassifier):
        return None
    return {
        "key": judge.key,
        "test_accuracy": judge.test_accuracy,
        **dataclasses.asdict(judge.settings),
    }


def _fidelity(
    features: dict[str, torch.Tensor],
    name: str,
    inception_missing: MetricResult | None,
    bootstrap: dict[str, int],
    seeds_text: str,
) -> MetricResult:
    """FID between row `name`'s images and the teacher's (same prompts and seeds)."""
    if inception_missing is not None:
        return inception_missing
    score = score_pair(features[name], features["teacher"], **bootstrap)
    detail = (
        f"{score.n} student vs {score.n} teacher images, pairwise the same prompt and seed; "
        "TF-Inception pool3; paired: each draw takes the same images from both sets"
    )
    return _with_seeds(score.metric(detail), seeds_text)


def _difference_key(name: str) -> str:
    """ "fid_student_minus_teacher" (what `distill export` and the model card read), or with
    several student rows, "fid_student_4_steps_minus_teacher"."""
    return "fid_" + name.replace(",", "").replace(" ", "_") + "_minus_teacher"


def _difference(fid_scores: dict[str, FIDScore], name: str) -> MetricResult:
    """Row `name`'s FID minus the teacher's, with the interval of the paired differences."""
    teacher, student = fid_scores["teacher"], fid_scores[name]
    if teacher.bootstrap is None or student.bootstrap is None:
        return MetricResult(student.value - teacher.value, teacher.n, "no interval computed")
    difference = difference_interval(teacher.bootstrap, student.bootstrap)
    return MetricResult(
        value=difference.point,
        n=teacher.n,
        detail=f"{name} FID − teacher FID, the same draws for both; {difference.describe()}",
        interval=difference.interval,
    )


def _folder_name(name: str) -> str:
    """images/<this>: "student", or "student-4-steps" for a row at one of several step counts."""
    return name.replace(", ", "-").replace(" ", "-")


def _notes(
    n: int,
    seed: int,
    resamples: int,
    judge: FashionClassifier | MetricResult | None,
    comparisons: dict[str, MetricResult],
    rows: Sequence[ReportRow],
) -> list[str]:
    """Paragraphs under the table: sample sizes and seeds, the FID comparison, the judge."""
    notes = [
        f"Every model: n = {n} images, prompt i generated with seed {seed} + i (seeds "
        f"{seed}..{seed + n - 1}); the metrics of a row are computed on those {n} images. "
        + (
            f"Intervals: 95%, from {resamples} half-samples of the images (seed {seed}; each "
            f"{n // 2} of the {n} without replacement), the same ones for every model."
            if resamples
            else "No bootstrap intervals were asked for."
        )
    ]
    for row in rows:
        difference = comparisons.get(_difference_key(row.name))
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
    if isinstance(judge, FashionClassifier):
        notes.append(
            "In-domain metrics (class acc., IS (in-domain)) are judged by a Fashion-MNIST "
            f"classifier, a {judge.describe()}: class acc. is the share of images it labels as "
            "their prompt's class (real test images score its test accuracy); IS (in-domain) is "
            "the Inception Score formula on its 10 logits (1 to 10). They measure the offline "
            "world's own classes and stand beside CLIP and the Inception IS, not in their place."
        )
    generated = [
        f"{row.name} {row.generation['images_per_second']:.2f} img/s"
        for row in rows
        if row.generation.get("images_per_second")
    ]
    if generated:
        notes.append(f"Generation this run: {', '.join(generated)}.")
    return notes


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


def _latencies(
    pipeline: DiffusionPipeline,
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
            batch_size=2 if uses_classifier_free_guidance(pipeline, settings) else 1,
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
