"""The recorded run: a seeded float64 run of `tiny_world.recorded_recipe` whose logged values are
kept in `tests/distill/recorded/tiny_run_terms.json`, and how a run is compared with it.

Why float64 and this tolerance (measured on one machine, 2026-12-03, by running the recipe under
other CPU code paths: `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2` in place of AVX-512, and 2 threads in place of 1):

| run dtype | largest relative change of a logged value, AVX2 path / 2 threads |
|---|---|
| float32 (cache float16) | 1.2e-3 / 2.2e-3 (what a second machine showed: 3.2e-3) |
| float64 (cache float32) | 1.8e-7 / 4.6e-11 |

The float64 run's remaining drift comes from what diffusers computes in fp32 whatever the model
dtype (the sinusoidal timestep embedding). `RELATIVE_TOLERANCE` is 50x that drift, and a real
change (noising, data order, a loss, the optimizer) moves them by 4e-4 to 2e-2
(`tests/distill/test_recorded_run.py` mutates each and sees the comparison fail).

Re-record (only for a change that is meant to move the numbers, said in the commit):

    .venv/bin/python tests/testkit/recorded_run.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

RECORD_PATH = Path(__file__).parents[1] / "distill" / "recorded" / "tiny_run_terms.json"
RELATIVE_TOLERANCE = 1e-5
ABSOLUTE_TOLERANCE = 1e-12

# What a record keeps of each logged line: the position, then every number the step computed.
POSITION_KEYS = ("stage", "step")
UNRECORDED_KEYS = {"stage_index", "it_per_s", "data_wait_s", "nonfinite_skipped"}


def logged_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").open()]


def recorded_values(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The part of each logged record the record keeps (timings and counters dropped)."""
    return [{k: v for k, v in r.items() if k not in UNRECORDED_KEYS} for r in records]


def mismatches(
    expected: list[dict[str, Any]],
    actual: list[dict[str, Any]],
    rel: float = RELATIVE_TOLERANCE,
    abs_: float = ABSOLUTE_TOLERANCE,
) -> list[str]:
    """Every recorded value that `actual` does not reproduce within the tolerance, as
    "stage step key: expected vs actual" lines (an empty list: the run matches)."""
    problems = []
    positions = [tuple(r[k] for k in POSITION_KEYS) for r in expected]
    logged = [tuple(r[k] for k in POSITION_KEYS) for r in actual]
    if positions != logged[: len(positions)] or len(logged) < len(positions):
        return [f"logged steps {logged} differ from the recorded {positions}"]
    for record, line in zip(expected, actual, strict=False):
        for key, value in record.items():
            if key in POSITION_KEYS:
                continue
            got = line.get(key)
            if got is None or abs(got - value) > abs_ + rel * abs(value):
                problems.append(f"{record['stage']} {record['step']} {key}: {value!r} vs {got!r}")
    return problems


def load_record() -> list[dict[str, Any]]:
    return json.loads(RECORD_PATH.read_text())["records"]


def _rerecord() -> None:
    """Run the recorded recipe in a temporary folder and rewrite the record (keeps "about")."""
    import torch

    from distill.recipe import validate_recipe
    from distill.trainer import DistillationTrainer
    from testkit.tiny_world import make_tiny_pipeline, recorded_recipe

    torch.set_num_threads(1)  # as the suite runs
    root = Path(tempfile.mkdtemp())
    teachers = {
        "a": make_tiny_pipeline(root / "a", seed=1),
        "b": make_tiny_pipeline(root / "b", seed=2),
    }
    raw = recorded_recipe(root / "run", teachers)
    DistillationTrainer(validate_recipe(raw), progress=False).train()
    about = json.loads(RECORD_PATH.read_text())["about"] if RECORD_PATH.is_file() else ""
    records = recorded_values(logged_records(Path(raw["output_dir"])))
    RECORD_PATH.write_text(json.dumps({"about": about, "records": records}, indent=1) + "\n")
    print(f"wrote {len(records)} records to {RECORD_PATH}")


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parents[2]), str(Path(__file__).parents[1])]
    _rerecord()
