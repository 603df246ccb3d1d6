"""`distill controlnet-init STUDENT OUT [--teacher T]`: a ControlNet to train on a student."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.commands.evaluate import vae_scale_factor
from core.atomic import atomic_folder
from core.errors import UserInputError
from core.families import resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "controlnet-init",
        help="build a diffusers ControlNetModel from a student (any variant)",
        description="Initialise a ControlNet from a student's layers, as "
        "ControlNetModel.from_unet does, also for students without a mid block (small, tiny): "
        "their ControlNet's mid block comes from --teacher when it fits, else fresh.",
    )
    parser.add_argument("student", help="a student pipeline or unet folder (or hub id)")
    parser.add_argument("out", type=Path, help="where to save the ControlNetModel")
    parser.add_argument(
        "--teacher",
        help="the teacher whose mid block a mid-block-less student's "
        "ControlNet starts from (pipeline or unet folder, or hub id)",
    )
    parser.add_argument("--conditioning-channels", type=int, default=3)
    parser.add_argument(
        "--vae-scale-factor",
        type=int,
        help="pixels per latent (default: from the student pipeline's VAE, else 8)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from students.controlnet import controlnet_from_student

    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"{str(args.out)!r} is not empty")
    student = resolve(args.student).unet()
    teacher = resolve(args.teacher).unet() if args.teacher else None
    factor = args.vae_scale_factor or vae_scale_factor(Path(args.student)) or 8
    try:
        controlnet, init = controlnet_from_student(
            student,
            teacher,
            conditioning_channels=args.conditioning_channels,
            vae_scale_factor=factor,
        )
    except ValueError as error:
        raise UserInputError(str(error)) from None
    with atomic_folder(args.out) as folder:
        controlnet.save_pretrained(folder, safe_serialization=True)
        (folder / "controlnet_init.json").write_text(
            json.dumps({"student": args.student, "teacher": args.teacher} | vars(init), indent=1)
        )
    print(f"ControlNet saved to {args.out}; its mid block: {init.mid_block} ({init.reason})")
    return 0
