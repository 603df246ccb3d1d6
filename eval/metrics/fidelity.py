"""Fidelity FID: a student row's images against the teacher's (the same prompts and seeds),
with a paired interval (each draw takes the same images from both): how closely the student
copies its teacher."""

from __future__ import annotations

from eval.fid import score_pair
from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.metrics.fid import bootstrap_settings
from eval.results import MetricResult


class FidelityFID(Metric):
    key = "fidelity_fid"
    columns = (Column("fidelity_fid", "fidelity FID ↓ (to teacher)", lambda v: f"{v:.2f}", True),)
    needs = frozenset({Need.INCEPTION, Need.TEACHER})

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        if row.name == "teacher" or context.teacher is None:
            return {}  # "—": the teacher has no fidelity to itself
        for features in (row.features, context.teacher.features):
            if features.missing is not None:
                return {"fidelity_fid": features.missing}
        score = score_pair(
            row.features.pool3, context.teacher.features.pool3, **bootstrap_settings(context)
        )
        detail = (
            f"{score.n} student vs {score.n} teacher images, pairwise the same prompt and seed; "
            f"TF-Inception pool3 ({row.features.preprocessing}); paired: each draw takes the same "
            "images from both sets"
        )
        return {"fidelity_fid": score.metric(detail)}
