"""Inception Score from the logits of the feature pass (the classifier head of torch-fidelity's
weights): no second pass over the images. Without the head (offline) the cell says so."""

from __future__ import annotations

from eval.inception_score import inception_score_of_logits
from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.results import MetricResult


class InceptionScore(Metric):
    key = "is"
    columns = (Column("is", "IS (Inception) ↑", lambda v: f"{v:.2f}"),)
    needs = frozenset({Need.INCEPTION_LOGITS})

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        features = row.features
        if features.logits is None:
            missing = features.missing or features.logits_missing
            return {"is": missing or MetricResult.missing("no Inception logits")}
        splits, seed = context.options.inception_score_splits, context.generation.seed
        mean, std = inception_score_of_logits(features.logits, splits, seed)
        return {
            "is": MetricResult(
                value=mean,
                n=len(features.logits),
                detail=f"{splits} splits (shuffle seed {seed}), std {std:.4g}; torch-fidelity "
                "Inception's logits via torchmetrics",
            )
        }
