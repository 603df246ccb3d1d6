"""Does the 16-bit latent cache train like the fp32 one? The same seeded run, twice, side by side.

    .venv/bin/python benchmarks/cache_precision.py --teacher runs/fashion_teacher/teacher_b

Runs the demo recipe's stage 2 (`recipes/fashion_small_sd.yaml`: task + output KD, student
initialized from the teacher) through `distill run` once with `data.cache_dtype: float16` and
once with `float32`, same seed, same everything else. Prints both loss curves (means over
`--window` logged steps) and the largest gap, and draws them side by side in one PNG.

The two runs differ only in the cache's rounding of the posterior mean and log-variance, so the
curves must agree to within the step-to-step noise of either.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from cli import main as distill_main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion_small_sd.yaml"
TERMS = ("loss/task", "loss/output_kd")


def run_once(
    teacher: str, dtype: str, steps: int, work: Path, max_samples: int | None = None
) -> list[dict]:
    raw = yaml.safe_load(RECIPE.read_text())
    if max_samples is not None:
        raw["data"]["max_samples"] = max_samples
    raw["data"]["cache_dir"] = str(work / "caches")  # never an old cache: both are built here
    raw["teachers"] = {"a": teacher, "b": teacher}
    raw["output_dir"] = str(work / f"run-{dtype}")
    raw["data"]["cache_dtype"] = dtype
    raw["training"].update(log_every=5, checkpoint_every=10_000, validate_every=0)
    raw["training"]["ema"] = {"enabled": False}
    stage = raw["stages"][1]  # soft labels: task + output KD
    stage.update(steps=steps, teacher="a")
    raw["stages"] = [stage]
    path = work / f"recipe-{dtype}.yaml"
    path.write_text(yaml.safe_dump(raw))
    if distill_main(["run", str(path), "--overwrite", "--no-progress"]) != 0:
        raise SystemExit(f"the {dtype} run failed")
    log = Path(raw["output_dir"]) / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def windowed(rows: list[dict], term: str, window: int) -> list[tuple[int, float]]:
    points = [(r["step"], r[term]) for r in rows if term in r]
    return [
        (points[i + window - 1][0], sum(v for _, v in points[i : i + window]) / window)
        for i in range(0, len(points) - window + 1, window)
    ]


def _to_pixels(
    points: list[tuple[int, float]], bounds: tuple[int, int, float, float], box: tuple[int, ...]
) -> list[tuple[float, float]]:
    """(step, value) points into the pixel box (left, top, right, bottom) of a panel."""
    first, last, low, high = bounds
    left, top, right, bottom = box
    return [
        (
            left + (step - first) / max(last - first, 1) * (right - left),
            bottom - (value - low) / max(high - low, 1e-12) * (bottom - top),
        )
        for step, value in points
    ]


def draw(curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> None:
    """One panel per loss term, both dtypes in it (fp16 blue, fp32 orange)."""
    width, height, pad = 480, 300, 40
    image = Image.new("RGB", (width * len(TERMS), height), "white")
    pen = ImageDraw.Draw(image)
    colours = {"float16": (31, 119, 180), "float32": (255, 127, 14)}
    for panel, term in enumerate(TERMS):
        x0 = panel * width
        box = (x0 + pad, pad, x0 + width - pad, height - pad)
        points = [p for dtype in curves for p in curves[dtype][term]]
        steps, values = [s for s, _ in points], [v for _, v in points]
        bounds = (min(steps), max(steps), min(values), max(values))
        pen.rectangle(box, outline="black")
        pen.text((x0 + pad, 10), f"{term} (mean of windows)", fill="black")
        pen.text((x0 + pad, height - pad + 5), f"step {bounds[0]}", fill="black")
        pen.text((x0 + width - pad - 60, height - pad + 5), f"step {bounds[1]}", fill="black")
        pen.text((x0 + 2, pad), f"{bounds[3]:.4f}", fill="black")
        pen.text((x0 + 2, height - pad - 10), f"{bounds[2]:.4f}", fill="black")
        for row, (dtype, colour) in enumerate(colours.items()):
            pen.line(_to_pixels(curves[dtype][term], bounds, box), fill=colour, width=2)
            pen.text((x0 + width - pad - 90, pad + 5 + 12 * row), dtype, fill=colour)
    image.save(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="an offline-world teacher pipeline")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=6, help="logged steps per mean")
    parser.add_argument("--out", type=Path, default=Path("runs/cache_precision.png"))
    parser.add_argument("--max-samples", type=int, help="training images (default: the recipe's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        dtypes = ("float16", "float32")
        logs = {
            d: run_once(args.teacher, d, args.steps, Path(work), args.max_samples) for d in dtypes
        }
    curves = {d: {t: windowed(rows, t, args.window) for t in TERMS} for d, rows in logs.items()}
    for term in TERMS:
        print(f"\n{term}: mean over {args.window} logged steps (every 5th step)")
        print(f"{'step':>6} {'float16':>10} {'float32':>10} {'gap':>8}")
        pairs = zip(curves["float16"][term], curves["float32"][term], strict=True)
        gaps = []
        for (step, half), (_, full) in pairs:
            gaps.append(abs(half - full) / full)
            print(f"{step:>6} {half:>10.5f} {full:>10.5f} {gaps[-1]:>8.1%}")
        print(f"largest relative gap: {max(gaps):.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(curves, args.out)
    print(f"\ncurves: {args.out}")
    return curves


if __name__ == "__main__":
    main()
