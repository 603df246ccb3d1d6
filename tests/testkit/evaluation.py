"""evaluate() at the smallest settings that still exercise every metric: 2 denoising steps,
2 IS splits, one latency repeat, no download, no progress bars."""

from __future__ import annotations

from typing import Any

from eval.evaluate import evaluate
from eval.protocols import evaluate_arguments

QUICK: dict[str, Any] = {
    "num_inference_steps": 2,
    "inception_score_splits": 2,
    "allow_download": False,
    "speed_warmup": 0,
    "speed_repeats": 1,
    "device": "cpu",
    "progress": False,
}


def quick_evaluate(model: Any, teacher: Any, prompts: Any, out_dir: Any, **settings: Any) -> dict:
    """evaluate() with flat settings, as a protocol or the CLI gives them, over QUICK's."""
    return evaluate(model, teacher, prompts, out_dir, **evaluate_arguments(QUICK | settings))
