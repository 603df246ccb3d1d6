"""A run's log: every loss term, the total, the learning rate and the gradient norm, per step.

Written to `RUN/logs/metrics.jsonl` (one JSON object a line, main process only, whatever the
trackers) and to the accelerate trackers that `training.report_to` names (tensorboard, wandb), all
under RUN/logs. The logger records what the step computed; it never recomputes a total from the
terms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from core.atomic import write_text_atomic

# `training.report_to` -> accelerate's `log_with`. "all" names our two rather than accelerate's
# "all", which would also start any other tracker that happens to be installed (comet, mlflow...).
TRACKERS: dict[str, list[str]] = {
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb"],
    "all": ["tensorboard", "wandb"],
    "none": [],
}


def tracker_init_kwargs(report_to: str, logs: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """accelerate's `init_trackers(init_kwargs=...)`: wandb writes its run folder under RUN/logs
    (as tensorboard does) and records the whole recipe as the run's config. `WANDB_MODE=offline`
    keeps it on disk, for `wandb sync` later."""
    if "wandb" not in TRACKERS[report_to]:
        return {}
    return {"wandb": {"dir": str(logs), "config": dict(config)}}


class RunLog:
    def __init__(self, accelerator: Accelerator, path: Path, stage_steps: Sequence[int]) -> None:
        """`stage_steps`: each stage's step count, so tracker steps count across stages."""
        self.accelerator = accelerator
        self.path = path
        self._stage_offsets = [sum(stage_steps[:i]) for i in range(len(stage_steps))]

    def rewind(self, stage_index: int, step: int) -> None:
        """Drop the records after (stage_index, step): a resumed run trains those steps again,
        so each step appears once in metrics.jsonl (tensorboard keeps both; it plots the last)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines(keepends=True)
            if line.strip() and _position(line) <= (stage_index, step)
        ]
        write_text_atomic(self.path, "".join(kept))

    def step(
        self,
        *,
        stage: str,
        stage_index: int,
        step: int,
        terms: Mapping[str, float],
        total: float | None,
        **scalars: float | int,
    ) -> dict[str, Any]:
        """Log one optimizer step: raw `terms`, their weighted `total` and other scalars
        (lr, grad_norm, it_per_s, counters). Returns the record written."""
        record: dict[str, Any] = {"stage": stage, "stage_index": stage_index, "step": step}
        record |= scalars
        record |= {f"loss/{name}": value for name, value in terms.items()}
        if total is not None:
            record["loss/total"] = total
        numbers = {f"{stage}/{k}": v for k, v in record.items() if isinstance(v, float | int)}
        self.accelerator.log(numbers, step=self._stage_offsets[stage_index] + step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        return record


def _position(line: str) -> tuple[int, int]:
    try:
        record = json.loads(line)
        return record["stage_index"], record["step"]
    except (json.JSONDecodeError, KeyError):  # a line cut by a crash mid-write
        return (1 << 30, 0)
