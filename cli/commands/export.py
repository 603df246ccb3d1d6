"""`distill export RUN_DIR OUT`: a finished run as a standard diffusers pipeline folder, or as
ONNX models for ONNX Runtime (`--format onnx`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.export import EXPORT_DTYPES, EXPORT_FORMATS, export_pipeline


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a finished run as a diffusers pipeline folder with a model card",
        description="Write the student UNet with the teacher's VAE, text encoder, tokenizer and "
        "scheduler as a standard diffusers pipeline folder (safetensors only).",
    )
    parser.add_argument("run_dir", type=Path, help="the run folder (output_dir of the recipe)")
    parser.add_argument("out", type=Path, help="where to write the pipeline folder")
    parser.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES))
    parser.add_argument(
        "--format",
        default="diffusers",
        choices=EXPORT_FORMATS,
        help="diffusers: safetensors folder; onnx: ONNX models for OnnxStableDiffusionPipeline",
    )
    parser.add_argument(
        "--metrics", type=Path, help="eval metrics.json for the model card (default: RUN/eval)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = export_pipeline(
        args.run_dir,
        args.out,
        dtype=args.dtype,
        metrics=args.metrics,
        overwrite=args.overwrite,
        format=args.format,
    )
    pipeline_class = json.loads((out / "model_index.json").read_text())["_class_name"]
    print(f"exported to {out} (load with {pipeline_class}.from_pretrained)")
    return 0
