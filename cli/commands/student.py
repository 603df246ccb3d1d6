"""`distill student`: build the compact student from a teacher and show what it costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserInputError
from core.families import builtin_names, resolve
from students import VARIANTS, build_student, count_params, forward_gflops, transformer_depths


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "student",
        help="build the student UNet from a teacher; print params, GFLOPs and the init report",
        description="Build the compact student UNet from a teacher UNet.",
    )
    parser.add_argument(
        "--teacher",
        required=True,
        help=f"builtin name ({', '.join(builtin_names())}), a local diffusers pipeline or unet "
        "folder, or a hub id",
    )
    parser.add_argument("--variant", default="base", help=f"one of {', '.join(VARIANTS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--out", type=Path, help="save the initialized student here (diffusers format)"
    )
    parser.add_argument("--verbose", action="store_true", help="list every fresh tensor")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.variant not in VARIANTS:
        raise UserInputError(
            f"unknown variant {args.variant!r}; choose one of {', '.join(VARIANTS)}"
        )
    source = resolve(args.teacher)
    if args.out is not None and source.kind == "builtin":
        raise UserInputError(
            f"--out needs real teacher weights; {args.teacher!r} is a builtin config (meta "
            "device). Pass a local diffusers folder or a hub id"
        )
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"--out folder {str(args.out)!r} is not empty")
    teacher = source.unet() if args.out is not None else source.meta_unet()
    student, report = build_student(teacher, args.variant)
    figures = {
        "teacher": args.teacher,
        "family": source.family.name,
        "variant": args.variant,
        "teacher_params": count_params(teacher),
        "student_params": count_params(student),
        "teacher_gflops": round(forward_gflops(teacher), 1),
        "student_gflops": round(forward_gflops(student), 1),
        "copied_tensors": len(report.copied),
        "fresh_tensors": len(report.fresh),
        "teacher_transformer_depth": transformer_depths(teacher),
        "student_transformer_depth": transformer_depths(student),
    }
    if args.out is not None:
        student.save_pretrained(args.out, safe_serialization=True)
        (args.out / "init_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        figures["saved_to"] = str(args.out)
    if args.json:
        print(json.dumps(figures))
    else:
        print(format_table(figures, teacher.config.sample_size))
        depth = figures["student_transformer_depth"]
        print(
            f"transformer layers per block: down {depth['down_blocks']}, "
            f"mid {depth['mid_block']}, up {depth['up_blocks']}"
        )
        print(report.summary() if args.verbose else report.summary().splitlines()[0])
        if args.out is not None:
            print(f"saved the student to {args.out}")
    return 0


def format_table(figures: dict, sample_size: int) -> str:
    def row(label: str, teacher: float, student: float, fmt: str) -> str:
        return (
            f"{label:<28}{format(teacher, fmt):>16}{format(student, fmt):>16}"
            f"{student / teacher:>10.1%}"
        )

    header = f"{'':<28}{'teacher':>16}{'student':>16}{'ratio':>10}"
    return "\n".join(
        [
            f"teacher {figures['teacher']} -> student {figures['variant']}",
            header,
            row("params", figures["teacher_params"], figures["student_params"], ",d"),
            row(
                f"GFLOPs/forward ({sample_size}x{sample_size})",
                figures["teacher_gflops"],
                figures["student_gflops"],
                ",.1f",
            ),
        ]
    )
