"""Export a finished run as a standard diffusers pipeline folder (StableDiffusionPipeline or
StableDiffusionXLPipeline, the teacher's family) with a model card.

The folder holds the student UNet plus the teacher's VAE, text encoder, tokenizer and scheduler,
as safetensors only, and loads with `<its pipeline class>.from_pretrained(folder)` with no
toolkit code installed. `format="onnx"` writes the same pipeline as ONNX models instead, for
ONNX Runtime (`distill.onnx_export`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DiffusionPipeline

from core.errors import UserInputError
from core.families import resolve, unet_folder, unet_from_config
from core.fingerprints import metrics_fingerprints, pipeline_fingerprint, short
from distill.card_data import card_data
from distill.kinds import stage_kind
from distill.provenance import RunProvenance
from distill.recipe import Recipe, validate_recipe
from students import count_params

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_FORMATS = ("diffusers", "onnx")


def export_pipeline(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "fp32",
    metrics: str | Path | None = None,
    overwrite: bool = False,
    format: str = "diffusers",
    progress: bool = True,
) -> Path:
    """Write `out` from the finished run in `run_dir`; returns `out`.

    `metrics` is an eval `metrics.json` for the model card (default: `run_dir/eval/metrics.json`
    when present). `format`: a diffusers folder of safetensors, or ONNX models (fp32 only).
    """
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    if format not in EXPORT_FORMATS:
        raise UserInputError(f"unknown format {format!r}; choose {', '.join(EXPORT_FORMATS)}")
    if format == "onnx" and dtype != "fp32":
        raise UserInputError("ONNX export is fp32 (ONNX Runtime's CPU kernels); drop --dtype")
    recipe = load_run_recipe(run_dir)
    pipeline_dir = run_dir / "student_pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        raise UserInputError(
            f"run {str(run_dir)!r} has not finished (no student_pipeline/); finish it with "
            "`distill run` first"
        )
    if format == "onnx":
        from distill.onnx_export import check_exportable

        index = json.loads((pipeline_dir / "model_index.json").read_text())
        unet_config = json.loads((unet_folder(pipeline_dir) / "config.json").read_text())
        check_exportable(index["_class_name"], unet_config)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserInputError(f"{str(out)!r} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    metrics_data = _read_metrics(metrics, run_dir)
    evaluated = evaluation_of(metrics_data, pipeline_dir)

    pipeline = resolve(pipeline_dir).pipeline(EXPORT_DTYPES[dtype])
    if format == "onnx":
        from distill.onnx_export import export_onnx

        export_onnx(pipeline, out, progress=progress)
    else:
        pipeline.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text(
        model_card(recipe, pipeline, dtype=dtype, metrics=evaluated, run_dir=run_dir, format=format)
    )
    return out


@dataclass(frozen=True)
class Evaluation:
    """What the model card may say about quality: metrics of exactly these weights, or why not."""

    metrics: dict[str, Any] | None
    fingerprint: str  # of the run's student_pipeline, the export's source
    why_not: str = ""


def evaluation_of(metrics: dict[str, Any] | None, pipeline_dir: Path) -> Evaluation:
    """The metrics, only when their student row was computed from the weights being exported.

    A metrics.json of a retrained student, of another run, or from before fingerprints existed
    would otherwise put numbers on the card that describe some other model.
    """
    fingerprint = pipeline_fingerprint(pipeline_dir)
    if metrics is None:
        return Evaluation(None, fingerprint, "no metrics.json for this run")
    evaluated = metrics_fingerprints(metrics).get("student")
    if evaluated != fingerprint:
        why = (
            "the metrics given were computed from other weights (student fingerprint "
            f"{short(evaluated)}, these weights {short(fingerprint)})"
            if evaluated
            else "the metrics given do not record which weights they were computed from"
        )
        return Evaluation(None, fingerprint, why)
    return Evaluation(metrics, fingerprint)


def _mixed_precision(recipe: Recipe, run_dir: Path) -> str:
    """The recipe's setting, with what "auto" resolved to on the training machine (each stage's
    record in provenance.json)."""
    setting = recipe.training.mixed_precision
    if setting != "auto":
        return setting
    resolved = sorted(
        {str(s.get("mixed_precision")) for s in RunProvenance(run_dir).stages.values()} - {"None"}
    )
    return f"auto ({', '.join(resolved)})" if resolved else "auto"


def load_run_recipe(run_dir: Path) -> Recipe:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise UserInputError(f"{str(run_dir)!r} is not a run folder (no recipe.yaml)")
    return validate_recipe(yaml.safe_load(path.read_text()), source=str(path))


def model_card(
    recipe: Recipe,
    pipeline: DiffusionPipeline,
    *,
    dtype: str,
    metrics: Evaluation,
    run_dir: Path,
    format: str = "diffusers",
) -> str:
    """The exported folder's README.md: what the model is, how it was made, what it scores."""
    init = recipe.teachers[recipe.student.init_from]
    student_params = count_params(pipeline.unet)
    teacher_params = _teacher_params(init)
    # The Hub's metadata: lineage, data, license, and a model-index of the scores only when
    # `metrics` passed the fingerprint check (distill.card_data).
    front = card_data(recipe, metrics.metrics)
    lines = [
        "---",
        front.to_yaml().strip(),
        "---",
        "",
        f"# {recipe.name}: a distilled Stable Diffusion student",
        "",
        f"A compact UNet (`{recipe.student.variant}` variant, layers_per_block=1) distilled with "
        "sd-distill from the teacher(s) below, initialized from the "
        f"layers of `{recipe.student.init_from}`. VAE, text encoder, tokenizer and scheduler are "
        "the teacher's. Weights: "
        + (
            "ONNX models, fp32, for ONNX Runtime." if format == "onnx" else f"safetensors, {dtype}."
        ),
        "",
        "| | params |",
        "|---|---|",
        f"| teacher UNet (`{recipe.student.init_from}`) | {teacher_params:,} |"
        if teacher_params
        else "| teacher UNet | unknown |",
        f"| student UNet | {student_params:,} |",
        "",
        "## Teachers",
        "",
        *[f"- `{key}`: {_display(value)}" for key, value in recipe.teachers.items()],
        "",
        "## Training",
        "",
        f"Data: `{_display(recipe.data.source)}` at {recipe.data.resolution} px"
        + (f", first {recipe.data.max_samples} samples" if recipe.data.max_samples else "")
        + (", random flips" if recipe.data.random_flip else "")
        + f". Mixed precision: {_mixed_precision(recipe, run_dir)}; EMA: "
        + (f"{recipe.training.ema.decay}" if recipe.training.ema.enabled else "off")
        + ".",
        "",
        "| stage | teacher | steps | batch | lr (schedule, warmup) | losses (weight) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {i + 1}. {s.name} | {s.teacher or '—'} | {s.steps:,} | "
            f"{s.batch_size}×{s.gradient_accumulation} | {s.lr:g} ({s.lr_schedule}, "
            f"{s.warmup_steps}) | "
            + ", ".join(
                f"{name} {block.weight:g}" for name, block in s.loss_blocks.items() if block.weight
            )
            + " |"
            for i, s in enumerate(recipe.stages)
        ],
        "",
        "## Evaluation",
        "",
        *_metrics_lines(metrics, dtype),
        "",
        "## Use",
        "",
        *_usage_sentence(recipe),
        "```python",
        *(
            _onnx_loading_lines()
            if format == "onnx"
            else _loading_lines(dtype, type(pipeline).__name__)
        ),
        f'image = pipe("a photo of a bag"{_call_arguments(recipe)}'
        + (_onnx_size_arguments(pipeline.unet.config.sample_size) if format == "onnx" else "")
        + ").images[0]",
        "```",
        "",
        f"Exported from run folder `{run_dir.name}`.",
        "",
    ]
    return "\n".join(lines)


def _loading_lines(dtype: str, pipeline_class: str) -> list[str]:
    # Half-precision folders must be loaded in that dtype: transformers keeps the text encoder's
    # stored dtype while diffusers would upcast the UNet, and the two would not multiply.
    if dtype == "fp32":
        return [
            f"from diffusers import {pipeline_class}",
            "",
            f'pipe = {pipeline_class}.from_pretrained("path/to/this/folder")',
        ]
    return [
        "import torch",
        f"from diffusers import {pipeline_class}",
        "",
        f"pipe = {pipeline_class}.from_pretrained(",
        f'    "path/to/this/folder", torch_dtype={EXPORT_DTYPES[dtype]}',
        ")",
    ]


def _onnx_loading_lines() -> list[str]:
    return [
        "from diffusers import OnnxStableDiffusionPipeline",
        "",
        "pipe = OnnxStableDiffusionPipeline.from_pretrained(",
        '    "path/to/this/folder", provider="CPUExecutionProvider", provider_options={}',
        ")",
    ]


def _onnx_size_arguments(latent_size: int) -> str:
    """The ONNX pipeline defaults to 512 px and makes latents of height // 8; the UNet was
    exported at its own latent size."""
    from distill.onnx_export import onnx_image_size

    size = onnx_image_size(latent_size)
    return f", height={size}, width={size}"


def _usage(recipe: Recipe) -> dict[str, Any]:
    last = recipe.stages[-1]
    return stage_kind(last.kind).usage(last.options)


def _call_arguments(recipe: Recipe) -> str:
    return "".join(f", {key}={value!r}" for key, value in _usage(recipe).items())


def _usage_sentence(recipe: Recipe) -> list[str]:
    """For a few-step student: its steps and guidance, and what the guidance does there."""
    usage = _usage(recipe)
    if "guidance_scale" not in usage:
        return []
    return [
        f"A few-step student (its last stage is `{recipe.stages[-1].kind}`): sample it with "
        f"{usage['num_inference_steps']} steps of its own scheduler "
        f"(`{recipe.stages[-1].kind}` saved it: LCMScheduler) and `guidance_scale="
        f"{usage['guidance_scale']:g}`, which its UNet reads through a guidance embedding (w = "
        "guidance_scale − 1, one UNet pass per step, no classifier-free guidance pass).",
        "",
    ]


def _teacher_params(source: str) -> int | None:
    """Parameter count of a teacher UNet from its config alone (meta device, no weights read)."""
    try:
        config = json.loads((unet_folder(source) / "config.json").read_text())
    except UserInputError:
        return None
    return count_params(unet_from_config(config, device="meta"))


def _display(value: str) -> str:
    return Path(value).name if Path(value).exists() else value


def _read_metrics(metrics: str | Path | None, run_dir: Path) -> dict[str, Any] | None:
    path = Path(metrics) if metrics else run_dir / "eval" / "metrics.json"
    if not path.is_file():
        if metrics:
            raise UserInputError(f"metrics file {str(path)!r} does not exist")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"metrics file {str(path)!r} is not JSON: {error}") from None


def _metrics_lines(evaluation: Evaluation, dtype: str) -> list[str]:
    if evaluation.metrics is None:
        return [
            f"Not evaluated: {evaluation.why_not}. Run `distill eval --model "
            f"RUN/student_pipeline --teacher ...` on these weights (fingerprint "
            f"{short(evaluation.fingerprint)}), then export again."
        ]
    metrics = evaluation.metrics
    settings = metrics.get("settings", {})
    described = ", ".join(f"{k} `{v}`" for k, v in settings.items() if v is not None)
    precision = "" if dtype == "fp32" else f" (exported here in {dtype})"
    return [
        metrics.get("table") or "(this metrics.json holds no table; re-run distill eval)",
        "",
        f"Measured on the fp32 weights of this student, fingerprint "
        f"`{short(evaluation.fingerprint)}`{precision}.",
        "",
        f"Settings: {described}." if described else "",
    ]
