"""`distill eval`: student vs teacher under one protocol -> metrics.json, report.md, a grid."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.errors import UserInputError
from core.paths import HUB_ID

RESULT_FILES = ("metrics.json", "report.md")
FASHION_TEST_REFERENCE = "fashion-mnist-test"
# The first images of the real test split (shuffled, so about class-balanced). Inception runs at
# ~5 images/s on 2 CPU cores, so all 10,000 would cost half an hour; statistics are cached.
FASHION_REFERENCE_SIZE = 1000


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a student (and its teacher): FID, CLIP, IS, params, GFLOPs, latency",
        description="Generate images for a prompt set with the student (and the teacher, same "
        "prompts and seeds), score them, and write metrics.json, report.md and a grid. Images "
        "are kept under OUT/images and reused only while the model's fingerprint (a hash of its "
        "weights) and every generation setting stay the same.",
    )
    parser.add_argument("--model", required=True, help="student pipeline folder or hub id")
    parser.add_argument("--teacher", help="teacher pipeline folder or hub id")
    parser.add_argument(
        "--protocol", help="named settings: bk-sdm-coco30k (BK-SDM's table) or fashion"
    )
    parser.add_argument(
        "--parity",
        choices=["bk-sdm"],
        help="generate and score exactly as BK-SDM's scripts did (one generator in prompt order, "
        "batch 1, JPEG files, pytorch-fid's resize) for numbers comparable to their table",
    )
    parser.add_argument("--prompts", help="a text file (one prompt per line), coco30k or fashion")
    parser.add_argument(
        "--reference",
        help="FID reference: image folder, saved dataset, .npz with mu/sigma, or "
        f"{FASHION_TEST_REFERENCE} (the offline world's real test set, first "
        f"{FASHION_REFERENCE_SIZE} images)",
    )
    parser.add_argument("--num-images", type=int, help="images per model")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--clip-model", help="transformers id/folder or open_clip:NAME[:TAG]")
    parser.add_argument(
        "--steps",
        type=_step_counts,
        help="inference steps; several (1,2,4,8) score the student at each, one row each, the "
        "teacher at --teacher-steps",
    )
    parser.add_argument(
        "--teacher-steps", type=int, help="the teacher's steps when --steps lists several"
    )
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument(
        "--seed", type=int, help="image i uses seed + i (--parity: one generator seeded once)"
    )
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default 4)")
    parser.add_argument("--reference-resize", type=int, help="resize reference images first")
    parser.add_argument("--is-splits", type=int, help="Inception Score splits")
    parser.add_argument("--speed-repeats", type=int, default=5, help="latency repeats (median)")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples behind each FID's 95%% interval (0: no intervals)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results in OUT and delete its generated images (made anew)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UserInputError(f"--bootstrap must be 0 (no intervals) or ≥ 2, got {args.bootstrap}")
    for flag, model in (("--model", args.model), ("--teacher", args.teacher)):
        if model is not None and not Path(model).is_dir() and not HUB_ID.match(model):
            raise UserInputError(f"{flag} {model!r} is not a folder (or a hub id owner/name)")
    existing = [name for name in RESULT_FILES if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise UserInputError(
            f"{str(args.out)!r} already holds results ({', '.join(existing)}); pass --overwrite"
        )
    settings = _settings(args)
    reference, reference_resize = _reference(args, settings)

    from eval.evaluate import evaluate
    from eval.protocols import evaluate_arguments

    settings |= {
        "reference": reference,
        "reference_resize": reference_resize,
        "batch_size": _batch_size(args),
        "speed_repeats": args.speed_repeats,
        "bootstrap_resamples": args.bootstrap,
    }
    arguments = evaluate_arguments(settings, args.parity)
    for name in existing:
        (args.out / name).unlink()
    evaluate(
        args.model,
        args.teacher,
        out_dir=args.out,
        fresh_images=args.overwrite,
        progress=not args.no_progress,
        **arguments,
    )
    print(f"report: {args.out / 'report.md'}\nmetrics: {args.out / 'metrics.json'}")
    return 0


def _batch_size(args: argparse.Namespace) -> int:
    """4 by default; under --parity their batch of 1, which an explicit other size contradicts."""
    if args.parity and args.batch_size not in (None, 1):
        raise UserInputError(
            f"--parity {args.parity} generates one image per call; drop --batch-size"
        )
    return args.batch_size or (1 if args.parity else 4)


def _step_counts(text: str) -> list[int]:
    """`25` or `1,2,4,8`: positive step counts, each once, in the order given."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a step count or a list like 1,2,4,8"
        ) from None
    if any(count < 1 for count in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: step counts must be positive and distinct")
    return counts


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol's settings (if any), overridden by explicit flags."""
    settings: dict[str, Any] = {
        "prompts": None,
        "num_images": None,
        "clip_model": None,
        "seed": 0,
        "num_inference_steps": 25,
        "guidance_scale": 7.5,
        "inception_score_splits": 10,
    }
    if args.protocol:
        from eval.protocols import get_protocol

        settings |= get_protocol(args.protocol).evaluate_kwargs()
    steps = args.steps or []
    several = len(steps) > 1
    explicit = {
        "prompts": args.prompts,
        "num_images": args.num_images,
        "clip_model": args.clip_model,
        "seed": args.seed,
        "num_inference_steps": args.teacher_steps if several else (steps or [None])[0],
        "student_steps": tuple(steps) if several else None,
        "guidance_scale": args.guidance,
        "inception_score_splits": args.is_splits,
        "reference_resize": args.reference_resize,
    }
    settings |= {key: value for key, value in explicit.items() if value is not None}
    if settings["prompts"] is None:
        raise UserInputError("give --prompts (a file, coco30k or fashion) or --protocol")
    return settings


def _reference(args: argparse.Namespace, settings: dict[str, Any]) -> tuple[Any, int | None]:
    return resolve_reference(args.reference, args.model, settings.pop("reference_resize", None))


def resolve_reference(
    reference: str | None, model: str, resize: int | None = None
) -> tuple[Any, int | None]:
    """(the FID reference `evaluate` takes, the size to resize it to): `fashion-mnist-test` is the
    real test set brought to `model`'s resolution through the same resize path."""
    if reference != FASHION_TEST_REFERENCE:
        return reference, resize
    from distill.data import load_image_text_dataset

    dataset = load_image_text_dataset(
        "fashion-mnist", split="test", max_samples=FASHION_REFERENCE_SIZE
    )
    return dataset, resize or _model_resolution(model)


def _model_resolution(model: str) -> int | None:
    import json

    unet_config = Path(model) / "unet" / "config.json"
    factor = vae_scale_factor(Path(model))
    if not (unet_config.is_file() and factor):
        return None
    return json.loads(unet_config.read_text())["sample_size"] * factor


def vae_scale_factor(pipeline: Path) -> int | None:
    """Pixels per latent of a pipeline folder's VAE, 2^(blocks − 1) as diffusers' pipelines
    compute it; None when `pipeline` holds no VAE (a bare unet folder, a hub id)."""
    import json

    config = pipeline / "vae" / "config.json"
    if not config.is_file():
        return None
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
