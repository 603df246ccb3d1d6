"""The report of `distill compare`: every run's metric cells, per-recipe summaries over seeds,
paired differences against a baseline recipe and against the teacher, the compute curve, and the
sentences that say which differences exclude 0 -> comparison.json, comparison.md, two plots.

    fid              FID of the student's n images against the reference data (lower is better)
    fidelity         FID between the student's and the teacher's images, row i against row i
                     (same prompt, same seed): how far the student is from its teacher
    class_accuracy   share of images the in-domain judge labels as the prompted class

Every cell is computed on the same n rows and the same R half-samples of them (one seed), so two
runs' resampled values pair row by row (eval.comparison).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_path, write_text_atomic
from eval.comparison import (
    DEFAULT_CONFIDENCE,
    CellScore,
    Difference,
    basic_interval,
    paired_difference,
    seed_spread,
    summarize,
)
from eval.fid import FIDStatistics
from eval.fid_bootstrap import PairedFID, ReferenceFID, Resample
from eval.model_scores import ModelScores

REPORT_FILES = ("comparison.json", "comparison.md", "comparison.png", "compute.png")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool
    percent: bool = False

    def format(self, value: float, signed: bool = False) -> str:
        scale, unit = (100.0, "%") if self.percent else (1.0, "")
        sign = "+" if signed else ""
        return f"{scale * value:{sign}.2f}{unit}"


METRICS = (
    Metric("fid", "FID to the data", lower_is_better=True),
    Metric("fidelity", "fidelity FID to the teacher", lower_is_better=True),
    Metric("class_accuracy", "class accuracy", lower_is_better=False, percent=True),
)
METRIC_BY_KEY = {metric.key: metric for metric in METRICS}


@dataclass(frozen=True)
class ScoredRun:
    """One trained student's cells. `compute` is samples seen (optimizer steps × global batch);
    `fingerprint` is the hash of the student pipeline's weights the cells were computed from."""

    recipe: str
    compute: int
    seed: int
    cells: Mapping[str, CellScore]
    fingerprint: str
    run_dir: str
    eval_steps: int


def resampled_cells(
    scores: ModelScores,
    reference: FIDStatistics,
    draws: Sequence[Resample],
    teacher: ModelScores | None = None,
) -> dict[str, CellScore]:
    """The metric cells of one model: FID to `reference`, class accuracy (where it was judged)
    and, given the `teacher`'s scores on the same rows, the fidelity FID."""
    fid = ReferenceFID(scores.features, reference.mu, reference.sigma)
    cells = {"fid": _cell(fid, draws)}
    if teacher is not None:
        cells["fidelity"] = _cell(PairedFID(scores.features, teacher.features), draws)
    if scores.correct is not None:
        correct = scores.correct.double()  # (n,)
        cells["class_accuracy"] = CellScore(
            float(correct.mean()),
            np.array([float(correct[draw.rows] @ draw.counts) / draw.n for draw in draws]),
        )
    return cells


def _cell(score: ReferenceFID | PairedFID, draws: Sequence[Resample]) -> CellScore:
    return CellScore(score(), np.array([score(draw) for draw in draws]))


@dataclass
class ComparisonReport:
    """Everything comparison.json holds, computed from the cells (`build_report`)."""

    settings: dict[str, Any]
    teacher: dict[str, Any]
    recipes: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "teacher": self.teacher,
            "recipes": self.recipes,
            "curve": self.curve,
            "findings": self.findings,
        }


def build_report(
    runs: Sequence[ScoredRun],
    teacher_cells: Mapping[str, CellScore],
    *,
    order: Sequence[str],
    baseline: str,
    base_compute: Mapping[str, int],
    curve_recipe: str | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    settings: Mapping[str, Any] | None = None,
) -> ComparisonReport:
    """Per recipe (in `order`, at its `base_compute`): summaries and differences against
    `baseline` and the teacher; for `curve_recipe`, student − teacher FID at every compute run."""
    by_recipe = {name: _runs_of(runs, name, base_compute[name]) for name in order}
    if not by_recipe[baseline]:
        raise ValueError(f"the baseline {baseline!r} has no scored runs")
    recipes = []
    for name in order:
        own = by_recipe[name]
        entry: dict[str, Any] = {
            "name": name,
            "compute": base_compute[name],
            "eval_steps": own[0].eval_steps if own else None,
            "seeds": [run.seed for run in own],
            "runs": [_run_row(run) for run in own],
            "summary": {
                key: summarize([run.cells[key].point for run in own]).to_dict()
                for key in _keys(own)
            },
            "vs_teacher": {},
            "vs_baseline": {},
        }
        cells = {key: {run.seed: run.cells[key] for run in own} for key in _keys(own)}
        for key in ("fid", "class_accuracy"):
            if key in cells and key in teacher_cells:
                # The teacher's images are one set: every seed is paired with the same cell.
                teacher = {seed: teacher_cells[key] for seed in cells[key]}
                entry["vs_teacher"][key] = paired_difference(
                    cells[key], teacher, confidence=confidence
                ).to_dict()
        if name != baseline:
            base_cells = {
                key: {run.seed: run.cells[key] for run in by_recipe[baseline]}
                for key in _keys(by_recipe[baseline])
            }
            for key in cells:
                if key in base_cells and set(cells[key]) & set(base_cells[key]):
                    entry["vs_baseline"][key] = paired_difference(
                        cells[key], base_cells[key], confidence=confidence
                    ).to_dict()
        recipes.append(entry)
    teacher = {
        key: {
            "point": cell.point,
            "interval": list(basic_interval(cell.point, cell.resampled, confidence)),
        }
        for key, cell in teacher_cells.items()
    }
    report = ComparisonReport(dict(settings or {}), teacher, recipes)
    if curve_recipe is not None:
        report.curve = _curve(
            runs, curve_recipe, base_compute[curve_recipe], teacher_cells, confidence
        )
    report.findings = findings(report, baseline, curve_recipe)
    return report


def _runs_of(runs: Sequence[ScoredRun], name: str, compute: int) -> list[ScoredRun]:
    return sorted(
        (run for run in runs if run.recipe == name and run.compute == compute),
        key=lambda run: run.seed,
    )


def _keys(runs: Sequence[ScoredRun]) -> list[str]:
    """The metrics every one of `runs` has, in METRICS order."""
    return [m.key for m in METRICS if runs and all(m.key in run.cells for run in runs)]


def _run_row(run: ScoredRun) -> dict[str, Any]:
    return {
        "seed": run.seed,
        "run_dir": run.run_dir,
        "fingerprint": run.fingerprint,
        **{key: cell.point for key, cell in run.cells.items()},
    }


def _curve(
    runs: Sequence[ScoredRun],
    name: str,
    base_compute: int,
    teacher_cells: Mapping[str, CellScore],
    confidence: float,
) -> list[dict[str, Any]]:
    """Student − teacher FID of `name` at each compute it ran; a point with one seed borrows the
    seed spread measured at `base_compute` (where the comparison ran every seed)."""
    computes = sorted({run.compute for run in runs if run.recipe == name})
    base = [
        run.cells["fid"].point - teacher_cells["fid"].point
        for run in _runs_of(runs, name, base_compute)
    ]
    lent = seed_spread(base)
    points = []
    for compute in computes:
        own = _runs_of(runs, name, compute)
        student = {run.seed: run.cells["fid"] for run in own}
        teacher = {seed: teacher_cells["fid"] for seed in student}
        difference = paired_difference(student, teacher, confidence=confidence, lent_spread=lent)
        points.append({"compute": compute, "vs_teacher_fid": difference.to_dict()})
    return points


def _difference(data: Mapping[str, Any]) -> Difference:
    return Difference(
        point=data["point"],
        interval=tuple(data["interval"]),
        seeds=tuple(data["seeds"]),
        per_seed=tuple(data["per_seed"]),
        seed_half_width=data["seed_half_width"],
        image_interval=tuple(data["image_interval"]),
        confidence=data["confidence"],
        seed_spread_lent=data["seed_spread_lent"],
    )


def findings(report: ComparisonReport, baseline: str, curve_recipe: str | None) -> list[str]:
    """The sentences: per metric, which recipes differ from the baseline (interval excludes 0)
    and in which direction; where the curve's interval first includes 0."""
    lines = []
    for metric in METRICS:
        better, worse, unclear = [], [], []
        for entry in report.recipes:
            data = entry["vs_baseline"].get(metric.key)
            if data is None:
                continue
            difference = _difference(data)
            text = f"{entry['name']} {_interval_text(metric, difference)}"
            if not difference.excludes_zero:
                unclear.append(text)
            elif (difference.point < 0) == metric.lower_is_better:
                better.append(text)
            else:
                worse.append(text)
        if not (better or worse or unclear):
            continue
        parts = []
        if better:
            parts.append(f"better than {baseline}: {'; '.join(better)}")
        if worse:
            parts.append(f"worse than {baseline}: {'; '.join(worse)}")
        if unclear:
            parts.append(
                f"not separated from {baseline} (interval includes 0): {'; '.join(unclear)}"
            )
        lines.append(f"{metric.label}: " + ". ".join(parts) + ".")
    if report.curve and curve_recipe is not None:
        parity = [p for p in report.curve if not _difference(p["vs_teacher_fid"]).excludes_zero]
        fid = METRIC_BY_KEY["fid"]
        points = ", ".join(
            f"{p['compute']:,} samples {_interval_text(fid, _difference(p['vs_teacher_fid']))}"
            for p in report.curve
        )
        if parity:
            lines.append(
                f"{curve_recipe} − teacher FID: {points}; the interval first includes 0 at "
                f"{parity[0]['compute']:,} samples."
            )
        else:
            lines.append(
                f"{curve_recipe} − teacher FID: {points}; at no compute tried does the interval "
                "include 0."
            )
    return lines


def _interval_text(metric: Metric, difference: Difference) -> str:
    low, high = difference.interval
    lent = ", seed spread lent" if difference.seed_spread_lent else ""
    seeds = len(difference.seeds)
    return (
        f"{metric.format(difference.point, signed=True)} [{metric.format(low, signed=True)}, "
        f"{metric.format(high, signed=True)}] ({seeds} seed{'s' * (seeds != 1)}{lent})"
    )


def write_report(report: ComparisonReport, out_dir: Path, command: str | None = None) -> None:
    """comparison.json, comparison.md and the plots in `out_dir`, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "comparison.json", json.dumps(report.to_dict(), indent=1) + "\n")
    figures = _plots(report, out_dir)
    write_text_atomic(out_dir / "comparison.md", markdown(report, figures, command))


def markdown(
    report: ComparisonReport, figures: Sequence[str] = (), command: str | None = None
) -> str:
    settings = report.settings
    confidence = settings.get("confidence", DEFAULT_CONFIDENCE)
    baseline = settings.get("baseline", "")
    lines = ["# Recipe comparison", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"{settings.get('num_images', '?')} images per model ({settings.get('protocol', '')}), "
        f"the teacher's once; seeds {settings.get('seeds', '?')}; intervals at "
        f"{100 * confidence:g}% from {settings.get('resamples', '?')} half-samples of the images "
        "and the spread across training seeds (eval/comparison.py). Mean ± standard deviation "
        "across seeds; Δ = recipe − baseline, paired by seed and image.",
        "",
        "| recipe | compute (samples) | "
        + " | ".join(m.label for m in METRICS)
        + f" | Δ FID vs {baseline} | Δ fidelity vs {baseline} | Δ accuracy vs {baseline} "
        "| student − teacher FID |",
        "|---|---:|" + "---:|" * (len(METRICS) + 4),
    ]
    for entry in report.recipes:
        steps = entry["eval_steps"]
        name = f"{entry['name']} ({steps} steps)" if steps else entry["name"]
        cells = [name, f"{entry['compute']:,}"]
        for metric in METRICS:
            summary = entry["summary"].get(metric.key)
            cells.append(_summary_text(metric, summary))
        for metric in METRICS:
            data = entry["vs_baseline"].get(metric.key)
            cells.append("baseline" if entry["name"] == baseline else _short(metric, data))
        cells.append(_short(METRICS[0], entry["vs_teacher"].get("fid")))
        lines.append("| " + " | ".join(cells) + " |")
    teacher = report.teacher
    if teacher:
        text = ", ".join(
            f"{METRIC_BY_KEY[key].label} {METRIC_BY_KEY[key].format(value['point'])} "
            f"[{METRIC_BY_KEY[key].format(value['interval'][0])}, "
            f"{METRIC_BY_KEY[key].format(value['interval'][1])}]"
            for key, value in teacher.items()
        )
        lines += ["", f"The teacher ({settings.get('teacher', '')}): {text}."]
    if report.findings:
        lines += ["", "## What the intervals say", ""] + [f"- {line}" for line in report.findings]
    if report.curve:
        lines += [
            "",
            "## Compute to parity",
            "",
            "| compute (samples) | seeds | student − teacher FID |",
            "|---:|---:|---:|",
        ]
        for point in report.curve:
            difference = point["vs_teacher_fid"]
            lines.append(
                f"| {point['compute']:,} | {len(difference['seeds'])} | "
                f"{_short(METRICS[0], difference)} |"
            )
    for figure in figures:
        lines += ["", f"![{figure}]({figure})"]
    return "\n".join(lines) + "\n"


def _summary_text(metric: Metric, summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "n/a"
    if summary["spread"] is None:
        return metric.format(summary["mean"])
    return f"{metric.format(summary['mean'])} ± {metric.format(summary['spread'])}"


def _short(metric: Metric, data: Mapping[str, Any] | None) -> str:
    if data is None:
        return "n/a"
    low, high = data["interval"]
    mark = "" if not _difference(data).excludes_zero else " *"
    return (
        f"{metric.format(data['point'], signed=True)} [{metric.format(low, signed=True)}, "
        f"{metric.format(high, signed=True)}]{mark}"
    )


def _plots(report: ComparisonReport, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    names = [entry["name"] for entry in report.recipes]
    figure, axes = pyplot.subplots(
        1, len(METRICS), figsize=(4.2 * len(METRICS), 0.45 * len(names) + 1.6), sharey=True
    )
    for axis, metric in zip(np.atleast_1d(axes), METRICS, strict=True):
        scale = 100.0 if metric.percent else 1.0
        for row, entry in enumerate(report.recipes):
            summary = entry["summary"].get(metric.key)
            if summary is None:
                continue
            values = scale * np.asarray(summary["values"])
            axis.plot(values, [row] * len(values), "o", color="0.7", markersize=4)
            data = entry["vs_baseline"].get(metric.key)
            if data is not None:
                low, high = data["interval"]
                base_mean = summary["mean"] - data["point"]
                axis.errorbar(
                    scale * summary["mean"],
                    row,
                    fmt="o",
                    color="C0",
                    capsize=3,
                    xerr=[[scale * (data["point"] - low)], [scale * (high - data["point"])]],
                )
                axis.axvline(scale * base_mean, color="0.5", linestyle=":", linewidth=1)
            else:
                axis.plot(scale * summary["mean"], row, "s", color="C3")
        teacher = report.teacher.get(metric.key)
        if teacher is not None:
            axis.axvline(
                scale * teacher["point"], color="C2", linestyle="--", linewidth=1, label="teacher"
            )
            axis.legend(loc="best", fontsize=8)
        axis.set_xlabel(metric.label + (" (%)" if metric.percent else ""))
        axis.grid(alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(range(len(names)), names)
    first.invert_yaxis()
    figure.suptitle(
        "Mean over seeds (grey: each seed); bars: the paired difference's interval "
        "against the baseline (square, dotted line)",
        fontsize=9,
    )
    figure.tight_layout()
    with atomic_path(out_dir / "comparison.png") as partial:
        figure.savefig(partial, dpi=110, format="png")
    pyplot.close(figure)
    written.append("comparison.png")

    if report.curve:
        figure, axis = pyplot.subplots(figsize=(5.5, 4.0))
        computes = [point["compute"] for point in report.curve]
        values = [point["vs_teacher_fid"]["point"] for point in report.curve]
        lows = [
            v - point["vs_teacher_fid"]["interval"][0]
            for v, point in zip(values, report.curve, strict=True)
        ]
        highs = [
            point["vs_teacher_fid"]["interval"][1] - v
            for v, point in zip(values, report.curve, strict=True)
        ]
        axis.errorbar(computes, values, yerr=[lows, highs], fmt="o-", capsize=3)
        axis.axhline(0, color="0.5", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("compute (samples seen: steps × batch)")
        axis.set_ylabel("student − teacher FID")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        with atomic_path(out_dir / "compute.png") as partial:
            figure.savefig(partial, dpi=110, format="png")
        pyplot.close(figure)
        written.append("compute.png")
    return written
