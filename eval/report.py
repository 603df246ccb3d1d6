"""The evaluation report: `metrics.json` (everything, machine-readable) and `report.md` (a
teacher-vs-student table, how each number was measured, and a comparison grid).

A row is one model (or a published reference result); each metric is a `MetricResult`, so every
cell is a number (with its interval, where one was computed), "n/a" with a numbered footnote under
the table saying why it could not be computed, or "—" where it does not apply (a teacher has no
fidelity to itself). Each row records the fingerprint of the weights it was computed from
(`core.fingerprints`); `metrics_fingerprints` reads them back, so `distill export` can tell
whether a metrics.json describes the weights it exports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from core.atomic import write_text_atomic
from core.fingerprints import metrics_fingerprints  # noqa: F401  (re-exported)
from eval.metrics.base import Column
from eval.plots import Figure
from eval.results import MetricResult

GRID_FILE = "comparison_grid.png"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
NOT_APPLICABLE = "—"
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass
class ReportRow:
    """One model's results; `metrics` maps a column key (a metric's `Column.key`) to its result;
    `fingerprint` identifies the weights behind them (None for published reference rows);
    `generation` holds how its images were made this run (throughput, reuse)."""

    name: str
    metrics: dict[str, MetricResult]
    source: str = ""
    fingerprint: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # "teacher" or "student" (a student has a row per step count)
    steps: int | None = None  # sampling steps of this row's images

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "model": self.model,
            "steps": self.steps,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "metrics": {key: result.to_dict() for key, result in self.metrics.items()},
        }
        if self.generation:
            data["generation"] = self.generation
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportRow:
        metrics = {key: MetricResult.from_dict(value) for key, value in data["metrics"].items()}
        return cls(
            name=data["name"],
            metrics=metrics,
            source=data.get("source", ""),
            fingerprint=data.get("fingerprint"),
            generation=data.get("generation") or {},
            model=data.get("model"),
            steps=data.get("steps"),
        )


@dataclass
class GridInfo:
    """A comparison grid to embed: the image and what its columns show."""

    image: Image.Image
    prompts: list[str]
    seeds: list[int]
    row_names: tuple[str, ...] = ("teacher", "student")


def format_value(result: MetricResult, column: Column) -> str:
    """The value, and its interval in brackets when it has one."""
    text = column.format(result.value)
    if result.interval is not None:
        low, high = result.interval
        text += f" [{column.format(low)}, {column.format(high)}]"
    return text


def visible_columns(
    rows: Sequence[ReportRow], columns: Sequence[Column] | None = None
) -> list[Column]:
    """`columns` (default: every registered metric's, `eval.metrics.registry`) that some row has,
    or that are not optional."""
    if columns is None:
        from eval.metrics.registry import report_columns

        columns = report_columns()
    return [
        column
        for column in columns
        if not column.optional or any(column.key in row.metrics for row in rows)
    ]


def markdown_table(rows: Sequence[ReportRow], columns: Sequence[Column] | None = None) -> str:
    """The table, then one numbered footnote per reason a cell is "n/a" (cells that fail for the
    same reason share a footnote)."""
    columns = visible_columns(rows, columns)
    footnotes: dict[tuple[str, str], list[str]] = {}  # (column header, reason) -> row names
    lines = [
        "| model | " + " | ".join(column.header for column in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = []
        for column in columns:
            result = row.metrics.get(column.key)
            if result is None:
                cells.append(NOT_APPLICABLE)
            elif result.value is None:
                names = footnotes.setdefault((column.header, _reason(result)), [])
                names.append(row.name)
                number = list(footnotes).index((column.header, _reason(result))) + 1
                cells.append("n/a" + str(number).translate(_SUPERSCRIPTS))
            else:
                cells.append(format_value(result, column))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    notes = [
        f"{str(number).translate(_SUPERSCRIPTS)} {header}, {', '.join(names)}: {reason}"
        for number, ((header, reason), names) in enumerate(footnotes.items(), start=1)
    ]
    return "\n".join(lines) + ("\n\n" + "  \n".join(notes) if notes else "")


def _reason(result: MetricResult) -> str:
    reason = result.unavailable or "not computed"
    return f"{reason} ({result.detail})" if result.detail else reason


def measurement_notes(rows: Sequence[ReportRow], columns: Sequence[Column] | None = None) -> str:
    """One line per computed (metric, model): n and how it was measured (seeds, model, protocol,
    interval). Metrics that could not be computed are in the table's footnotes."""
    lines = []
    for column in visible_columns(rows, columns):
        for row in rows:
            result = row.metrics.get(column.key)
            if result is None or result.value is None:
                continue
            n = f"n={result.n}; " if result.n is not None else ""
            lines.append(f"- **{column.header}**, {row.name}: {n}{result.detail}")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    rows: Sequence[ReportRow],
    *,
    title: str = "Teacher vs student",
    settings: dict[str, Any] | None = None,
    grid: GridInfo | None = None,
    notes: Sequence[str] = (),
    comparisons: dict[str, MetricResult] | None = None,
    plot: Figure | None = None,
    columns: Sequence[Column] | None = None,
) -> dict[str, Any]:
    """Write `metrics.json`, `report.md` (and the grid and plot PNGs) into `out_dir`; return the
    json data. `notes` are paragraphs shown under the table (sample sizes, seeds, the in-domain
    judge); `comparisons` are results about two rows at once (the student-minus-teacher FID);
    `plot` is shown after the notes (FID against latency); `columns`: the table's (default: every
    registered metric's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "settings": settings or {},
        "fingerprints": {row.name: row.fingerprint for row in rows if row.fingerprint},
        "rows": [row.to_dict() for row in rows],
        "table": markdown_table(rows, columns),  # as shown here, for model cards (distill export)
    }
    if comparisons:
        data["comparisons"] = {key: result.to_dict() for key, result in comparisons.items()}
    sections = [f"# {title}", markdown_table(rows, columns), *notes]
    if plot is not None:
        plot.figure.savefig(out_dir / plot.file, dpi=120, bbox_inches="tight")
        data["plot"] = {"file": plot.file, "caption": plot.caption}
        sections.append(f"![{plot.caption}]({plot.file})\n\n{plot.caption}")
    sections += ["## How each number was measured", measurement_notes(rows, columns)]
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
    write_text_atomic(out_dir / REPORT_FILE, "\n\n".join(sections) + "\n")
    # `distill export` trusts this file: it is the old one or the new one, never half of one.
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data
