"""Figures of an evaluation report, drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eval.report import ReportRow

FID_LATENCY_FILE = "fid_latency.png"


@dataclass
class Figure:
    figure: Any  # matplotlib.figure.Figure
    file: str  # where the report puts it, beside report.md
    caption: str


def fid_latency_plot(rows: Sequence[ReportRow]) -> Figure | None:
    """FID against pipeline latency, one point per row that has both (the teacher and each
    student row together), 95% FID intervals as bars; None for fewer than two such rows."""
    points = []
    for row in rows:
        fid, latency = row.metrics.get("fid"), row.metrics.get("pipeline_latency")
        if fid is not None and fid.value is not None and latency is not None and latency.value:
            points.append((row.name, latency.value, fid.value, fid.interval))
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, axes = pyplot.subplots(figsize=(5.5, 4.0))
    for name, latency, value, interval in points:
        error = None if interval is None else [[value - interval[0]], [interval[1] - value]]
        axes.errorbar(latency, value, yerr=error, fmt="o", capsize=3)
        axes.annotate(name, (latency, value), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xscale("log")
    # Decades apart or not, label the points' own latencies, not log-scale minor ticks.
    latencies = sorted({latency for _, latency, _, _ in points})
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xticks(latencies, [f"{latency:.3g}" for latency in latencies], fontsize=7)
    axes.set_xlabel("pipeline latency, s / image (log scale)")
    axes.set_ylabel("FID ↓")
    axes.grid(alpha=0.3)
    pyplot.close(figure)
    caption = (
        "FID against pipeline latency per image, one point per row of the table, with its 95% "
        "interval"
    )
    return Figure(figure, FID_LATENCY_FILE, caption)
