"""CLIP score, in two conventions, each labelled: the mean cosine similarity of image and prompt
embeddings (BK-SDM's `eval_clip_score.py`: SD v1.4 0.2958 with open_clip ViT-g-14) and
torchmetrics' `CLIPScore` (100 × that mean, clamped at 0). One torchmetrics pass gives both."""

from __future__ import annotations

from eval.clip_score import TORCHMETRICS_SCALE, ClipBackend, clip_score, load_clip_backend
from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.results import MetricResult

NO_MODEL_DETAIL = "pass a transformers hub id or folder, or open_clip:NAME[:PRETRAINED]"


class ClipScore(Metric):
    key = "clip"
    columns = (
        Column("clip", "CLIP ↑ (cosine)", lambda v: f"{v:.4f}"),
        Column("clip_x100", "CLIP ×100 ↑ (torchmetrics)", lambda v: f"{v:.2f}", optional=True),
    )
    needs = frozenset({Need.IMAGES, Need.PROMPTS})

    def __init__(self) -> None:
        self.backend: ClipBackend | None = None

    def prepare(self, context: EvalContext) -> None:
        """Loaded once for every row: BK-SDM's ViT-g-14 has 1.4B parameters."""
        spec = context.options.clip_model
        if spec is not None:
            self.backend = (
                spec if isinstance(spec, ClipBackend) else load_clip_backend(spec, context.device)
            )

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        if self.backend is None:
            return {"clip": MetricResult.missing("no CLIP model given", detail=NO_MODEL_DETAIL)}
        result = clip_score(
            row.images.paths,
            row.images.prompts,
            self.backend,
            device=context.device,
            progress=context.progress,
        )
        if not result.available:
            return {"clip": result}
        scaled = MetricResult(
            value=result.value * TORCHMETRICS_SCALE,
            n=result.n,
            detail=f"CLIP {self.backend.name}, torchmetrics CLIPScore (100 × mean cosine)",
        )
        return {"clip": result, "clip_x100": scaled}

    def unavailable(self, reason: str, detail: str = "") -> dict[str, MetricResult]:
        """One footnote for CLIP, not two: the ×100 column shows only where CLIP ran."""
        return {"clip": MetricResult.missing(reason, detail)}

    def settings(self) -> dict[str, object]:
        """The loaded model's name (a backend object given in Python has no spec string)."""
        return {"clip_model": self.backend.name} if self.backend is not None else {}
