"""FID against the reference, with a 95% interval from half-samples of the images, and each
student row's FID minus the teacher's (the same draws for both: a paired interval)."""

from __future__ import annotations

from collections.abc import Sequence

from eval.fid import FIDScore, reference_detail, score_against_reference
from eval.fid_bootstrap import difference_interval
from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.results import MetricResult


def bootstrap_settings(context: EvalContext) -> dict[str, int]:
    """One seed for every bootstrap: sets of the same n draw the same resamples, so the
    teacher's, the student's and the fidelity FID's resampled values are paired."""
    return {
        "resamples": context.options.bootstrap_resamples,
        "seed": context.generation.seed,
        "max_bootstrap_images": context.options.max_bootstrap_images,
    }


def difference_key(name: str) -> str:
    """ "fid_student_minus_teacher" (what `distill export` and the model card read), or with
    several student rows, "fid_student_4_steps_minus_teacher"."""
    return "fid_" + name.replace(",", "").replace(" ", "_") + "_minus_teacher"


class ReferenceFID(Metric):
    key = "fid"
    columns = (Column("fid", "FID ↓ [95% interval]", lambda v: f"{v:.2f}"),)
    needs = frozenset({Need.INCEPTION, Need.REFERENCE})

    def __init__(self) -> None:
        self.scores: dict[str, FIDScore] = {}  # row name -> its FID and bootstrap draws

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        if context.reference is None:
            return {"fid": context.reference_missing or MetricResult.missing("no reference")}
        if row.features.missing is not None:
            return {"fid": row.features.missing}
        score = score_against_reference(
            row.features.pool3, context.reference, **bootstrap_settings(context)
        )
        self.scores[row.name] = score
        n = score.n
        reference = context.options.reference
        detail = reference_detail(n, context.reference, reference)
        return {"fid": score.metric(f"{detail}; {row.features.preprocessing}")}

    def compare(self, rows: Sequence[Row], context: EvalContext) -> dict[str, MetricResult]:
        if "teacher" not in self.scores:
            return {}
        return {
            difference_key(row.name): self._difference(row.name)
            for row in rows
            if row.name != "teacher" and row.name in self.scores
        }

    def _difference(self, name: str) -> MetricResult:
        """Row `name`'s FID minus the teacher's, with the interval of the paired differences."""
        teacher, student = self.scores["teacher"], self.scores[name]
        if teacher.bootstrap is None or student.bootstrap is None:
            return MetricResult(student.value - teacher.value, teacher.n, "no interval computed")
        difference = difference_interval(teacher.bootstrap, student.bootstrap)
        return MetricResult(
            value=difference.point,
            n=teacher.n,
            detail=f"{name} FID − teacher FID, the same draws for both; {difference.describe()}",
            interval=difference.interval,
        )
