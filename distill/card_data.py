"""The model card's metadata for the Hugging Face Hub: `huggingface_hub.ModelCardData` with the
lineage (`base_model`: the teachers), `datasets`, `license` (the teacher's) and a `model-index`
of the evaluation's student metrics, only when they were computed from the exported weights.

What the Hub reads from the card's YAML front matter: it links the teachers and the data, shows
the license, and lists the scores in the model-index widget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from core.paths import HUB_ID
from distill.recipe import Recipe

TAGS = ["stable-diffusion", "text-to-image", "knowledge-distillation", "sd-distill"]
# Builtin data sources and the hub datasets they are copies of.
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}
# Quality metrics of an eval row -> the model-index's metric type and name; cost columns (params,
# GFLOPs, latency) describe the network, not a benchmark score, and stay in the card's table.
INDEXED_METRICS = {
    "fid": ("FID", "FID against the reference images"),
    "fidelity_fid": ("FID", "fidelity FID (student images against the teacher's, same seeds)"),
    "clip": ("clip_score", "CLIP score"),
    "is": ("inception_score", "Inception Score"),
    "class_accuracy": ("accuracy", "class accuracy (in-domain judge)"),
    "in_domain_is": ("inception_score", "Inception Score (in-domain judge)"),
}
FALLBACK_LICENSE = "other"


def card_data(
    recipe: Recipe, metrics: dict[str, Any] | None, model_name: str | None = None
) -> ModelCardData:
    """The front matter of an exported student's card. `metrics`: an eval metrics.json already
    checked to describe these weights (distill.export.evaluation_of), or None."""
    # The init teacher first: the student's weights, and so its license, come from it.
    init = recipe.teachers[recipe.student.init_from]
    teachers = list(dict.fromkeys([init, *recipe.teachers.values()]))
    hub_teachers = [t for t in teachers if _is_hub_id(t)]
    dataset = HUB_DATASETS.get(recipe.data.source) or (
        recipe.data.source if _is_hub_id(recipe.data.source) else None
    )
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=TAGS,
        license=_teacher_license(teachers),
        base_model=hub_teachers or None,
        base_model_relation="finetune" if hub_teachers else None,
        datasets=[dataset] if dataset else None,
    )
    results = _eval_results(metrics, dataset) if metrics else []
    if results:
        data.model_name = model_name or recipe.name
        data.eval_results = results
    return data


def _is_hub_id(value: str) -> bool:
    return not Path(value).exists() and bool(HUB_ID.match(value))


def _teacher_license(teachers: list[str]) -> str:
    """The license of the first of `teachers` (the init teacher first) whose local card names one
    (SD v1.x: creativeml-openrail-m). A hub teacher's card cannot be read offline, and a teacher
    without one (the offline world's) has none to inherit: "other"."""
    for teacher in teachers:
        readme = Path(teacher) / "README.md"
        if readme.is_file():
            license_id = ModelCard.load(readme).data.to_dict().get("license")
            if license_id:
                return license_id
    return FALLBACK_LICENSE


def _eval_results(metrics: dict[str, Any], dataset: str | None) -> list[EvalResult]:
    student = next((row for row in metrics.get("rows", []) if row.get("name") == "student"), None)
    if student is None:
        return []
    settings = metrics.get("settings", {})
    prompts = str(settings.get("prompts") or settings.get("protocol") or "prompts")
    results = []
    for key, (metric_type, metric_name) in INDEXED_METRICS.items():
        value = (student.get("metrics", {}).get(key) or {}).get("value")
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type="text-to-image",
                dataset_type=dataset or prompts,
                dataset_name=prompts,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=float(value),
                verified=False,
            )
        )
    return results
