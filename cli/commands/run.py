"""`distill run RECIPE [key.sub=value ...]`: run a recipe's stages, resuming where it stopped."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from core import plugins
from core.errors import UserInputError
from distill.builtin_recipes import find_recipe
from distill.recipe import load_recipe, read_saved_recipe, resolve_paths


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a recipe (distillation stages, or the offline teacher training)",
        description="Run a recipe. An interrupted run resumes from its last checkpoint.",
    )
    parser.add_argument(
        "recipe",
        help="a YAML recipe file, or a builtin recipe's name (`distill recipes` lists them)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. stages.0.steps=10"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="require resuming from the last checkpoint"
    )
    group.add_argument(
        "--overwrite", action="store_true", help="delete the run folder and start afresh"
    )
    group.add_argument(
        "--restart-stage",
        action="store_true",
        help="train the interrupted stage again from its start (e.g. after its teacher or data "
        "changed); finished stages are kept",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    args.recipe = find_recipe(args.recipe)
    if args.no_progress:  # the libraries' own loading bars too
        import datasets
        import diffusers
        import transformers

        datasets.disable_progress_bars()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    kind = _recipe_kind(args.recipe)
    if kind != "distill":  # a registered recipe kind, e.g. the offline world's teachers
        run_kind = plugins.load(plugins.RECIPE_KINDS, kind)
        if run_kind is None:
            known = ", ".join(["distill", *plugins.registered(plugins.RECIPE_KINDS)])
            raise UserInputError(f"{args.recipe}: unknown recipe kind {kind!r}; known: {known}")
        return run_kind(
            args.recipe, args.overrides, overwrite=args.overwrite, progress=not args.no_progress
        )
    recipe = resolve_paths(load_recipe(args.recipe, args.overrides), args.recipe.parent)
    run_dir = Path(recipe.output_dir)
    _check_run_dir(run_dir, recipe.model_dump(mode="json"), args.resume, args.overwrite)

    from distill.preemption import PREEMPTED_EXIT_CODE, Preempted
    from distill.trainer import DistillationTrainer, TrainingStopped

    trainer = DistillationTrainer(
        recipe,
        resume=True if args.resume else None,
        progress=not args.no_progress,
        restart_stage=args.restart_stage,
    )
    try:
        pipeline = trainer.train()
    except TrainingStopped as error:
        print(f"distill run: stopped: {error}", file=sys.stderr)
        return 1
    except Preempted as error:
        print(f"distill run: preempted: {error}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if trainer.accelerator.is_main_process and pipeline is not None:
        print(f"done: the student pipeline is in {pipeline}")
    return 0


def _recipe_kind(path: Path) -> str:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return "distill"  # load_recipe reports the problem in one line
    return raw.get("kind", "distill") if isinstance(raw, dict) else "distill"


def _check_run_dir(run_dir: Path, resolved: dict, resume: bool, overwrite: bool) -> None:
    """An existing run folder is resumed only by the same recipe; `--overwrite` starts afresh."""
    saved = run_dir / "recipe.yaml"
    if overwrite:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    if not saved.is_file():
        if resume:
            raise UserInputError(f"--resume: {str(run_dir)!r} holds no run to resume")
        return
    previous = read_saved_recipe(saved)
    changed = sorted(_differences(previous, resolved))
    if changed:
        raise UserInputError(
            f"{str(run_dir)!r} holds a run of a different recipe (changed: "
            f"{', '.join(changed[:5])}); pass --overwrite or choose another output_dir"
        )


def _differences(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]
