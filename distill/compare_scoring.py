"""Scoring the runs of `distill compare` under one protocol: the teacher once, every student on
the same prompts and seeds, one Inception network, one reference, one judge, one set of
half-samples -> an eval.comparison_report.ComparisonReport.

    DIR/scores/teacher/                   the teacher's images and scores
    DIR/scores/<recipe>/x<scale>/seed<k>/ each student's (eval.model_scores: reused while the
                                          weights' fingerprint and every setting stay the same)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.errors import UserInputError
from core.fingerprints import short
from core.plugins import JUDGES, registered
from distill.compare import Entry, PlannedRun, compute_of, scale_tag
from eval.comparison_report import ComparisonReport, ScoredRun, build_report, resampled_cells
from eval.generate import GenerationSettings
from eval.model_scores import score_model


def score_comparison(
    runs: Sequence[PlannedRun],
    entries: Sequence[Entry],
    *,
    teacher: str,
    out_dir: Path,
    scale: Fraction,
    baseline: str,
    curve: str | None,
    protocol_name: str,
    reference: str,
    num_images: int,
    resamples: int,
    batch_size: int,
    progress: bool = True,
    device: torch.device | None = None,
    judge_settings: Any | None = None,
) -> ComparisonReport:
    """Score every run (finished: `distill.compare.train_runs`) and the teacher; the report's
    order, baseline and compute come from `entries` at `scale`. `judge_settings`: the in-domain
    classifier's `ClassifierSettings` (None: its defaults)."""
    from cli.commands.evaluate import resolve_reference
    from eval.fid import reference_statistics
    from eval.fid_bootstrap import resamples as half_samples
    from eval.inception import load_inception, resolve_inception_weights, weights_digest
    from eval.prompts import load_prompts
    from eval.protocols import evaluate_arguments, get_protocol

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    protocol = get_protocol(protocol_name)
    prompts = load_prompts(protocol.prompts, num_images, seed=protocol.seed)
    # The protocol's generation settings as `distill eval` reads them, at this batch size.
    arguments = evaluate_arguments(protocol.evaluate_kwargs() | {"batch_size": batch_size})
    settings = arguments["generation"]
    inception = load_inception(device=device)
    inception_key = weights_digest(resolve_inception_weights())
    reference_data, resize = resolve_reference(reference, teacher, protocol.reference_resize)
    statistics = reference_statistics(
        reference_data, inception, resize_to=resize, device=device, progress=progress
    )
    judge = _judge(prompts, judge_settings, device, progress)
    draws = half_samples(len(prompts), resamples, seed=protocol.seed)
    common = {
        "inception": inception,
        "inception_key": inception_key,
        "judge": judge,
        "device": device,
        "progress": progress,
    }

    teacher_scores = score_model(
        teacher, out_dir / "scores" / "teacher", prompts, settings, desc="teacher", **common
    )
    teacher_cells = resampled_cells(teacher_scores, statistics, draws)
    scored = []
    for run in tqdm(runs, desc="score runs", unit="run", disable=not progress):
        run_settings = settings.with_steps(run.entry.eval_steps)
        scores = score_model(
            run.student_pipeline,
            out_dir / "scores" / run.key,
            prompts,
            run_settings,
            desc=run.key,
            **common,
        )
        scored.append(
            ScoredRun(
                recipe=run.entry.name,
                compute=run.compute,
                seed=run.seed,
                cells=resampled_cells(scores, statistics, draws, teacher_scores),
                fingerprint=scores.fingerprint,
                run_dir=str(run.run_dir),
                eval_steps=run_settings.num_inference_steps,
            )
        )
    base_compute = {entry.name: compute_of(entry.recipe, scale) for entry in entries}
    return build_report(
        scored,
        teacher_cells,
        order=[entry.name for entry in entries],
        baseline=baseline,
        base_compute=base_compute,
        curve_recipe=curve,
        settings=_settings(
            entries,
            runs,
            teacher,
            teacher_scores.fingerprint,
            protocol_name,
            reference,
            statistics.n,
            settings,
            len(prompts),
            resamples,
            scale,
            baseline,
            inception_key,
            judge,
        ),
    )


def _settings(
    entries: Sequence[Entry],
    runs: Sequence[PlannedRun],
    teacher: str,
    teacher_fingerprint: str,
    protocol: str,
    reference: str,
    reference_images: int | None,
    generation: GenerationSettings,
    num_images: int,
    resamples: int,
    scale: Fraction,
    baseline: str,
    inception_key: str,
    judge: Any,
) -> dict[str, Any]:
    """What every number of the report depends on, for comparison.json."""
    from dataclasses import asdict

    from eval.comparison import DEFAULT_CONFIDENCE

    return {
        "protocol": protocol,
        "num_images": num_images,
        "generation": asdict(generation),
        "reference": reference,
        "reference_images": reference_images,
        "resamples": resamples,
        "resampling": "half-samples without replacement, seeded by the protocol's seed",
        "confidence": DEFAULT_CONFIDENCE,
        "seeds": sorted({run.seed for run in runs if run.scale == scale}),
        "steps_scale": str(scale),
        "scale_tag": scale_tag(scale),
        "baseline": baseline,
        "teacher": teacher,
        "teacher_fingerprint": short(teacher_fingerprint),
        "inception_weights_sha256": inception_key,
        "judge": None
        if judge is None
        else {"key": judge.key, "test_accuracy": judge.test_accuracy},
        "recipe_files": {entry.name: str(entry.path) for entry in entries},
        "compute": "optimizer steps x batch x gradient accumulation, summed over stages",
    }


def _judge(prompts: Sequence[str], settings: Any, device: torch.device, progress: bool) -> Any:
    """The first registered judge (entry point group `sd_distill.judges`: the offline world's
    Fashion-MNIST classifier) that applies to `prompts`, or None: no class accuracy."""
    for name, point in registered(JUDGES).items():
        judge = point.load()
        if not judge.applies(prompts):
            continue
        try:
            return judge.load(settings, device=device, progress=progress)
        except UserInputError as reason:  # e.g. no Fashion-MNIST data
            print(f"distill compare: no class accuracy from {name}: {reason}", file=sys.stderr)
    return None
