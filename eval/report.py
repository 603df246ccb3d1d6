"""The evaluation report: `metrics.json` (everything, machine-readable) and `report.md` (a
teacher-vs-student table, how each number was measured, and a comparison grid).

A row is one model (or a published reference result); each metric is a `MetricResult`, so every
cell is either a number with its `n` and method, or "unavailable: <reason>".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from eval.results import MetricResult

GRID_FILE = "comparison_grid.png"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    format: Callable[[float], str]


COLUMNS = (
    Column("fid", "FID ↓", lambda v: f"{v:.2f}"),
    Column("clip", "CLIP ↑", lambda v: f"{v:.4f}"),
    Column("is", "IS ↑", lambda v: f"{v:.2f}"),
    Column("params", "UNet params", lambda v: f"{v / 1e6:.4g}M"),
    Column("gflops", "GFLOPs", lambda v: f"{v:.4g}"),
    Column("unet_latency", "UNet s/step", lambda v: f"{v:.4f}"),
    Column("pipeline_latency", "pipeline s/image", lambda v: f"{v:.3f}"),
)


@dataclass
class ReportRow:
    """One model's results; `metrics` maps a column key (`COLUMNS`) to its result."""

    name: str
    metrics: dict[str, MetricResult]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "metrics": {key: result.to_dict() for key, result in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportRow:
        metrics = {key: MetricResult.from_dict(value) for key, value in data["metrics"].items()}
        return cls(name=data["name"], metrics=metrics, source=data.get("source", ""))


@dataclass
class GridInfo:
    """A comparison grid to embed: the image and what its columns show."""

    image: Image.Image
    prompts: list[str]
    seeds: list[int]
    row_names: tuple[str, ...] = ("teacher", "student")


def cell(result: MetricResult | None, column: Column) -> str:
    if result is None:
        return "—"
    if result.value is None:
        return f"unavailable: {result.unavailable}"
    return column.format(result.value)


def markdown_table(rows: Sequence[ReportRow]) -> str:
    lines = [
        "| model | " + " | ".join(column.header for column in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [cell(row.metrics.get(column.key), column) for column in COLUMNS]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measurement_notes(rows: Sequence[ReportRow]) -> str:
    """One line per (metric, model): n and how it was measured (seeds, model, protocol)."""
    lines = []
    for column in COLUMNS:
        for row in rows:
            result = row.metrics.get(column.key)
            if result is None:
                continue
            n = f"n={result.n}; " if result.n is not None else ""
            text = result.detail
            if result.value is None:
                text = f"unavailable: {result.unavailable}" + (f" ({text})" if text else "")
            lines.append(f"- **{column.header}**, {row.name}: {n}{text}")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    rows: Sequence[ReportRow],
    *,
    title: str = "Teacher vs student",
    settings: dict[str, Any] | None = None,
    grid: GridInfo | None = None,
) -> dict[str, Any]:
    """Write `metrics.json`, `report.md` (and the grid PNG) into `out_dir`; return the json data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"settings": settings or {}, "rows": [row.to_dict() for row in rows]}
    sections = [f"# {title}", markdown_table(rows), "## How each number was measured"]
    sections.append(measurement_notes(rows))
    if settings:
        sections.append("## Settings\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in settings.items()))
    if grid is not None:
        grid.image.save(out_dir / GRID_FILE)
        data["grid"] = {"file": GRID_FILE, "prompts": grid.prompts, "seeds": grid.seeds}
        rows_text = ", ".join(f"row {i + 1}: {name}" for i, name in enumerate(grid.row_names))
        captions = "\n".join(
            f"{i + 1}. seed {seed}: {prompt}"
            for i, (prompt, seed) in enumerate(zip(grid.prompts, grid.seeds, strict=True))
        )
        sections.append(
            f"## Samples\n\nSame prompts and seeds in each column ({rows_text}).\n\n"
            f"![comparison grid]({GRID_FILE})\n\nColumns:\n\n{captions}"
        )
    (out_dir / REPORT_FILE).write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    (out_dir / METRICS_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def make_comparison_grid(
    teacher_images: Sequence[Image.Image],
    student_images: Sequence[Image.Image],
    labels: Sequence[str],
    *,
    row_names: Sequence[str] = ("teacher", "student"),
    label_height: int = 14,
) -> Image.Image:
    """Teacher images in the top row, student images below, column `i` captioned `labels[i]`
    (cut to fit) and each row named on the left. Images are shown at the teacher's image size."""
    if not (len(teacher_images) == len(student_images) == len(labels)) or not labels:
        raise ValueError("need one teacher image, one student image and one label per column")
    width, height = teacher_images[0].size
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_width = 4 + max(int(probe.textlength(name, font=font)) for name in row_names)
    grid = Image.new("RGB", (name_width + width * len(labels), label_height + 2 * height), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        x = name_width + column * width
        draw.text((x + 1, 1), _fit(label, width - 2, draw, font), fill="black", font=font)
        for row, image in enumerate((teacher_images[column], student_images[column])):
            tile = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            grid.paste(tile, (x, label_height + row * height))
    for row, name in enumerate(row_names):
        draw.text((2, label_height + row * height + height // 2 - 5), name, fill="black", font=font)
    return grid


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw, font: Any) -> str:
    """`text`, shortened with "..." until it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""
