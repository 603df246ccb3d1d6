"""The metric registry: a metric is one module plus one line, and the offline world's judge
arrives through an entry point, never through an import from `eval/`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.metrics.base import Column, EvalContext, Metric, Need, Row
from eval.metrics.registry import metric_classes, register_metric, unregister_metric
from eval.results import MetricResult
from testkit.evaluation import quick_evaluate

PROMPTS = ["a photo of a Dress", "a photo of a Bag", "a photo of a Coat", "a photo of a Sneaker"]
ROOT = Path(__file__).resolve().parents[2]


# --- the module a user writes: ---------------------------------------------------------------
class MeanBrightness(Metric):
    """Mean pixel value of the images, 0-255: a toy metric, computed straight from the files."""

    key = "brightness"
    columns = (Column("brightness", "brightness", lambda v: f"{v:.1f}"),)
    needs = frozenset({Need.IMAGES})

    def score(self, row: Row, context: EvalContext) -> dict[str, MetricResult]:
        values = [np.asarray(Image.open(path)).mean() for path in row.images.paths]
        return {"brightness": MetricResult(float(np.mean(values)), len(values), "mean pixel")}


# ----------------------------------------------------------------------------------------------


@pytest.fixture
def brightness_registered() -> Iterator[None]:
    register_metric(MeanBrightness)  # the one line
    yield
    unregister_metric(MeanBrightness.key)


def test_a_metric_is_one_module_and_one_line(
    tmp_path: Path, student_pipeline, brightness_registered, empty_torch_hub
) -> None:
    data = quick_evaluate(student_pipeline, None, PROMPTS, tmp_path, num_images=4)
    (row,) = data["rows"]
    files = sorted((tmp_path / "images" / "student").glob("*.png"))
    expected = float(np.mean([np.asarray(Image.open(path)).mean() for path in files]))
    result = row["metrics"]["brightness"]
    assert result["value"] == pytest.approx(expected) and result["n"] == 4
    assert result["detail"].startswith("seeds 0..3")  # per-image metrics name their seeds
    header = (tmp_path / "report.md").read_text().splitlines()[2]
    assert "| brightness |" in header
    # Quality first, then the registered metric, then the cost columns.
    keys = [metric.key for metric in metric_classes()]
    assert keys.index("brightness") < keys.index("cost") == len(keys) - 1
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"][0]["metrics"]["brightness"]


def test_the_offline_judge_is_an_entry_point_and_eval_never_imports_the_offline_world() -> None:
    from offline.in_domain import FashionInDomain

    assert FashionInDomain in metric_classes()
    imports = re.compile(r"^\s*(from|import)\s+offline\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("eval", "distill", "core", "students")
        for path in (ROOT / folder).rglob("*.py")
        if imports.search(path.read_text())
    ]
    assert offenders == []
