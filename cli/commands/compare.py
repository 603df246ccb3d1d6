"""`distill compare RECIPE[@STEPS]... --seeds N --out DIR`: which recipe should I use?

Each recipe is trained with each seed at equal compute (distill.compare), every final student is
scored under one protocol against the teacher's images, generated once (eval.model_scores), and
the report gives per-recipe summaries over seeds and paired differences with intervals that
count both the image sample and the seeds (eval.comparison, eval.comparison_report). A rerun
reuses finished runs and computed scores, and resumes an interrupted run from its checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from core.errors import UserInputError

DEFAULT_NUM_IMAGES = 500
DEFAULT_RESAMPLES = 1000


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="train recipes over seeds at equal compute and compare them with intervals",
        description="Train every RECIPE with every seed into OUT/runs (finished runs are "
        "reused), score each final student against one teacher under one protocol, and write "
        "OUT/comparison.json, comparison.md and plots. RECIPE@STEPS scores that recipe's "
        "students at STEPS sampling steps (a few-step student).",
    )
    parser.add_argument("recipes", nargs="+", metavar="RECIPE[@STEPS]", help="recipe files")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    parser.add_argument("--out", type=Path, required=True, help="comparison folder")
    parser.add_argument(
        "--baseline", help="the recipe name differences are taken against (default: the first)"
    )
    parser.add_argument(
        "--steps-scale",
        default="1",
        help="every stage's steps times this (1, 0.5, 1/3): the compute of the whole comparison",
    )
    parser.add_argument("--curve", help="a recipe name to run at more compute (--curve-scales)")
    parser.add_argument(
        "--curve-scales", default="2,4", help="multiples of the compute for --curve (default 2,4)"
    )
    parser.add_argument("--curve-seeds", type=int, default=1, help="seeds per curve point")
    parser.add_argument(
        "--protocol", default="fashion", help="evaluation protocol (default fashion)"
    )
    parser.add_argument(
        "--teacher",
        help="the teacher every student is scored against (default: the last teacher a stage of "
        "the first recipe distills from)",
    )
    parser.add_argument(
        "--reference",
        default="fashion-mnist-test",
        help="FID reference: image folder, saved dataset, .npz, or fashion-mnist-test",
    )
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES)
    parser.add_argument(
        "--resamples", type=int, default=DEFAULT_RESAMPLES, help="half-samples per interval"
    )
    parser.add_argument("--batch-size", type=int, default=50, help="generation batch")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument(
        "--allow-unequal", action="store_true", help="compare recipes of different compute"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from distill.compare import (
        RunFailed,
        check_equal_compute,
        check_names,
        parse_entry,
        parse_scale,
        plan_runs,
        train_runs,
    )

    for flag, value, least in (
        ("--seeds", args.seeds, 1),
        ("--curve-seeds", args.curve_seeds, 1),
        ("--jobs", args.jobs, 1),
        ("--num-images", args.num_images, 4),
        ("--resamples", args.resamples, 2),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < least:
            raise UserInputError(f"{flag} must be at least {least}, got {value}")
    entries = [parse_entry(text) for text in args.recipes]
    check_names(entries)
    names = [entry.name for entry in entries]
    scale = parse_scale(args.steps_scale)
    if not args.allow_unequal:
        check_equal_compute(entries, scale)
    baseline = args.baseline or names[0]
    curve = None
    for flag, name in (("--baseline", baseline), ("--curve", args.curve)):
        if name is not None and name not in names:
            raise UserInputError(f"{flag} {name!r} is not one of the recipes: {', '.join(names)}")
    if args.curve is not None:
        curve = entries[names.index(args.curve)]
    curve_scales = [parse_scale(text) for text in args.curve_scales.split(",")] if curve else []
    teacher = args.teacher or _default_teacher(entries)
    if not Path(teacher).is_dir():
        raise UserInputError(f"teacher {teacher!r} is not a pipeline folder")

    runs = plan_runs(
        entries,
        range(args.seeds),
        scale,
        args.out,
        curve=curve,
        curve_scales=curve_scales,
        curve_seeds=range(args.curve_seeds),
    )
    try:
        train_runs(runs, jobs=args.jobs, progress=not args.no_progress)
    except RunFailed as error:
        print(f"distill compare: stopped: {error}", file=sys.stderr)
        return 1

    from distill.compare_scoring import score_comparison

    report = score_comparison(
        runs,
        entries,
        teacher=teacher,
        out_dir=args.out,
        scale=scale,
        baseline=baseline,
        curve=curve.name if curve else None,
        protocol_name=args.protocol,
        reference=args.reference,
        num_images=args.num_images,
        resamples=args.resamples,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    from eval.comparison_report import write_report

    command = "distill compare " + " ".join(shlex.quote(arg) for arg in sys.argv[2:])
    write_report(report, args.out, command=command if sys.argv[1:2] == ["compare"] else None)
    for line in report.findings:
        print(line)
    print(f"report: {args.out / 'comparison.md'}\ndata:   {args.out / 'comparison.json'}")
    return 0


def _default_teacher(entries) -> str:
    """The teacher the last distilling stage of the first recipe that has one learns from."""
    from distill.recipe import resolve_paths

    for entry in entries:
        for stage in reversed(entry.recipe.stages):
            if stage.teacher is not None:
                resolved = resolve_paths(entry.recipe, entry.path.parent)
                return resolved.teachers[stage.teacher]
    raise UserInputError("no recipe names a teacher: pass --teacher")
