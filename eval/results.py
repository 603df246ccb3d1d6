"""One metric's outcome: a value with the sample size behind it, or the reason there is none.

Every number in the report carries how it was measured (`n`, seeds, model) and, where one was
computed, its interval; a metric that could not run (no CLIP weights offline, no Inception
classifier head) says why instead of crashing the evaluation or showing a blank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class MetricUnavailable(Exception):
    """A metric cannot run in this environment (missing weights, no classifier head, ...)."""


@dataclass(frozen=True)
class MetricResult:
    """`value` measured on `n` samples (images, or timing repeats); `detail` says how, including
    how `interval` (low, high) was obtained when there is one.

    When the metric could not run, `value` is None and `unavailable` holds the reason.
    """

    value: float | None
    n: int | None = None
    detail: str = ""
    unavailable: str | None = None
    interval: tuple[float, float] | None = None

    @classmethod
    def missing(cls, reason: str, detail: str = "") -> MetricResult:
        return cls(value=None, detail=detail, unavailable=reason)

    @property
    def available(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.interval is not None:
            data["interval"] = list(self.interval)  # what json gives back
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricResult:
        """Read `to_dict`'s output; files written before intervals existed have none."""
        data = dict(data)
        interval = data.pop("interval", None)
        return cls(**data, interval=tuple(interval) if interval is not None else None)
