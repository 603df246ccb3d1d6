"""The metrics `evaluate` runs: the built-in ones, then those registered by other packages (entry
point group `sd_distill.metrics`, e.g. the offline world's in-domain judge), then the cost
columns. Adding a metric is its module and one line here (or one `register_metric` call)."""

from __future__ import annotations

from core.plugins import METRICS, registered
from eval.metrics.base import Column, Metric
from eval.metrics.clip import ClipScore
from eval.metrics.cost import Cost
from eval.metrics.fid import ReferenceFID
from eval.metrics.fidelity import FidelityFID
from eval.metrics.inception_score import InceptionScore

BUILTIN: dict[str, type[Metric]] = {
    "fid": ReferenceFID,
    "fidelity_fid": FidelityFID,
    "clip": ClipScore,
    "is": InceptionScore,
}
COST = Cost  # last: quality first, then what the quality costs
_REGISTERED: dict[str, type[Metric]] = {}  # register_metric, in call order


def register_metric(metric: type[Metric]) -> type[Metric]:
    """Add `metric` to every later evaluation (usable as a class decorator)."""
    _REGISTERED[metric.key] = metric
    return metric


def unregister_metric(key: str) -> None:
    _REGISTERED.pop(key, None)


def metric_classes() -> list[type[Metric]]:
    """Every metric, in report order: built-in, entry points, registered, cost."""
    classes = dict(BUILTIN)
    for name, point in sorted(registered(METRICS).items()):
        classes.setdefault(name, point.load())
    classes.update(_REGISTERED)
    classes[COST.key] = COST
    return list(classes.values())


def report_columns() -> list[Column]:
    return [column for metric in metric_classes() for column in metric.columns]
