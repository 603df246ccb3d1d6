"""Registered parts found through package entry points, so a user of the engine (the offline
world, or a user's own package) adds a data source, a recipe kind, a stage kind or a model
family without the engine importing it. Declared in a pyproject.toml:

    [project.entry-points."sd_distill.sources"]
    fashion-mnist = "offline.fashion_mnist:load_fashion_mnist"   # (split=, max_samples=) -> Dataset

    [project.entry-points."sd_distill.recipe_kinds"]
    teacher = "offline.teacher_recipe:run_teacher_recipe"      # (path, overrides, ...) -> exit

    [project.entry-points."sd_distill.stage_kinds"]
    autoencoder = "offline.autoencoder:AutoencoderKind"        # a distill.kinds.StageKind

    [project.entry-points."sd_distill.families"]
    sd = "core.families.sd:StableDiffusion"                    # a core.families.ModelFamily

    [project.entry-points."sd_distill.prompt_sets"]
    fashion = "offline.fashion_mnist:fashion_prompts"          # (num, seed) -> list[str]

    [project.entry-points."sd_distill.metrics"]
    in_domain = "offline.in_domain:FashionInDomain"            # an eval.metrics.Metric

    [project.entry-points."sd_distill.judges"]
    fashion-mnist = "offline.in_domain:FashionJudge"           # .applies(prompts), .load(...)
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

SOURCES = "sd_distill.sources"
RECIPE_KINDS = "sd_distill.recipe_kinds"
STAGE_KINDS = "sd_distill.stage_kinds"
FAMILIES = "sd_distill.families"
METRICS = "sd_distill.metrics"
PROMPT_SETS = "sd_distill.prompt_sets"
JUDGES = "sd_distill.judges"


def registered(group: str) -> dict[str, Any]:
    """name -> entry point (loaded on `.load()`) of every part registered in `group`."""
    return {point.name: point for point in entry_points(group=group)}


def load(group: str, name: str) -> Any | None:
    point = registered(group).get(name)
    return point.load() if point is not None else None
