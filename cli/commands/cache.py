"""`distill cache RECIPE [key.sub=value ...]`: build (or complete) a recipe's latent caches.

The caches the stages train on, without training: on CPU nodes before GPU time starts, or as a
job of its own. With several processes (`accelerate launch ... -m cli cache RECIPE`)
each encodes its own shards. A cache already complete is reused; one interrupted is completed.
"""

from __future__ import annotations

import argparse

from distill.builtin_recipes import find_recipe
from distill.recipe import load_recipe, resolve_paths


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="build a recipe's latent caches without training",
        description="Encode the recipe's data with each stage teacher's VAE and tokenizer, once "
        "per distinct cache. Prints pairs, skipped rows, bytes per pair and images/s.",
    )
    parser.add_argument("recipe", help="a YAML recipe file, or a builtin recipe's name")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    args.recipe = find_recipe(args.recipe)
    from accelerate import Accelerator

    from distill.plan import plan_run
    from distill.stage import open_cache
    from distill.teacher import load_pipeline_components

    recipe = resolve_paths(load_recipe(args.recipe, args.overrides), args.recipe.parent)
    plan = plan_run(recipe)
    accelerator = Accelerator()
    # Stages with one teacher share its cache. Only stages that read the latent cache, with a
    # VAE that exists before the run (not one an earlier stage of the run trains).
    sources = dict.fromkeys(
        stage.source.key
        for stage in plan.stages
        if stage.kind.reads_latents and not _encodes_with_a_trained_vae(plan, stage)
    )
    for key in sources:
        components = load_pipeline_components(recipe.teachers[key])
        cache = open_cache(
            recipe.data, components, accelerator, seed=recipe.seed, progress=not args.no_progress
        )
        if accelerator.is_main_process:
            skipped = sum(cache.skipped.values())
            print(
                f"teacher {key}: {cache.folder} holds {len(cache)} pairs "
                f"({skipped} rows skipped), {cache.bytes_per_pair / 1024:.1f} KB per pair"
            )
    return 0


def _encodes_with_a_trained_vae(plan, stage) -> bool:
    earlier = plan.stages[: stage.index]
    return stage.source is plan.init and any(s.kind.component == "vae" for s in earlier)
