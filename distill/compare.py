"""`distill compare`: recipes trained over seeds at equal compute, scored under one protocol.

    DIR/runs/<recipe>/x<scale>/seed<k>/   one run folder per (recipe, compute, seed): `distill run`
                                          with `seed=k output_dir=...` and every stage's steps
                                          times the compute scale; a finished one is reused, an
                                          interrupted one resumes from its checkpoint
    DIR/runs/<recipe>/x<scale>/seed<k>.log  that run's output
    DIR/scores/<teacher | recipe/x<scale>/seed<k>>/   images and features (eval.model_scores)
    DIR/comparison.json, comparison.md, comparison.png (and compute.png with a compute curve)

Compute is counted as optimizer steps × global batch (samples seen), summed over stages: a
consistency step (teacher ODE step + target network) costs more FLOPs than a plain one, and the
report's compute column counts only samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from core.errors import UserInputError
from distill.builtin_recipes import find_recipe
from distill.recipe import Recipe, load_recipe, read_saved_recipe, resolve_paths


@dataclass(frozen=True)
class Entry:
    """One recipe of a comparison; `eval_steps` scores it at that many sampling steps (a few-step
    student) instead of the protocol's."""

    path: Path
    recipe: Recipe
    eval_steps: int | None = None

    @property
    def name(self) -> str:
        return self.recipe.name


def parse_entry(text: str) -> Entry:
    """`recipes/x.yaml` or `recipes/x.yaml@4` (scored at 4 steps); a builtin recipe's name
    (`compare/fashion_koala`) in place of a file."""
    path_text, _, steps_text = text.partition("@")
    steps = None
    if steps_text:
        if not steps_text.isdigit() or int(steps_text) < 1:
            raise UserInputError(f"{text!r}: the steps after @ must be a positive integer")
        steps = int(steps_text)
    path = find_recipe(path_text)
    return Entry(path, load_recipe(path), steps)


def parse_scale(text: str) -> Fraction:
    """`1`, `0.5`, `1/3`: a positive fraction."""
    try:
        scale = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise UserInputError(f"compute scale {text!r} is not a number like 1, 0.5 or 1/3") from None
    if scale <= 0:
        raise UserInputError(f"compute scale {text!r} must be positive")
    return scale


def scale_tag(scale: Fraction) -> str:
    return (
        f"x{scale.numerator}"
        if scale.denominator == 1
        else f"x{scale.numerator}-{scale.denominator}"
    )


def scaled_steps(recipe: Recipe, scale: Fraction) -> list[int]:
    """Every stage's steps times `scale`, rounded, at least 1."""
    return [max(1, round(stage.steps * scale)) for stage in recipe.stages]


def compute_of(recipe: Recipe, scale: Fraction) -> int:
    """Samples seen: Σ over stages of steps × batch × gradient accumulation (one process; a
    comparison runs each recipe in one process, so that is the global batch)."""
    steps = scaled_steps(recipe, scale)
    return sum(
        s * stage.batch_size * stage.gradient_accumulation
        for s, stage in zip(steps, recipe.stages, strict=True)
    )


@dataclass(frozen=True)
class PlannedRun:
    entry: Entry
    scale: Fraction
    seed: int
    run_dir: Path

    @property
    def key(self) -> str:
        return f"{self.entry.name}/{scale_tag(self.scale)}/seed{self.seed}"

    @property
    def log(self) -> Path:
        return self.run_dir.with_suffix(".log")

    @property
    def student_pipeline(self) -> Path:
        return self.run_dir / "student_pipeline"

    @property
    def finished(self) -> bool:
        """Its pipeline exists (written atomically, last) and was trained by this very recipe: a
        run folder left by an edited recipe file is handed back to `distill run`, which refuses
        it in one line rather than letting a stale student into the report."""
        saved = self.run_dir / "recipe.yaml"
        if not (saved.is_file() and self.student_pipeline.is_dir()):
            return False
        return read_saved_recipe(saved) == self.resolved_recipe()

    def resolved_recipe(self) -> dict:
        """The recipe as `distill run` resolves and saves it for this run."""
        recipe = load_recipe(self.entry.path, self.overrides())
        return resolve_paths(recipe, self.entry.path.parent).model_dump(mode="json")

    @property
    def compute(self) -> int:
        return compute_of(self.entry.recipe, self.scale)

    def overrides(self) -> list[str]:
        steps = scaled_steps(self.entry.recipe, self.scale)
        return [
            f"seed={self.seed}",
            f"output_dir={self.run_dir.resolve()}",
            *(f"stages.{i}.steps={s}" for i, s in enumerate(steps)),
        ]


def plan_runs(
    entries: Sequence[Entry],
    seeds: Sequence[int],
    scale: Fraction,
    out_dir: Path,
    *,
    curve: Entry | None = None,
    curve_scales: Sequence[Fraction] = (),
    curve_seeds: Sequence[int] = (),
) -> list[PlannedRun]:
    """Every entry at `scale` with every seed, then the curve's entry at each of `curve_scales`
    (multiples of `scale`) with `curve_seeds`."""
    runs = [
        PlannedRun(entry, scale, seed, _run_dir(out_dir, entry, scale, seed))
        for entry in entries
        for seed in seeds
    ]
    for multiple in curve_scales if curve is not None else ():
        point = scale * multiple
        runs += [
            PlannedRun(curve, point, seed, _run_dir(out_dir, curve, point, seed))
            for seed in curve_seeds
        ]
    return runs


def _run_dir(out_dir: Path, entry: Entry, scale: Fraction, seed: int) -> Path:
    return out_dir / "runs" / entry.name / scale_tag(scale) / f"seed{seed}"


def check_equal_compute(entries: Sequence[Entry], scale: Fraction) -> None:
    """One line naming two different totals, raised as a UserInputError (exit code 2)."""
    totals = {entry.name: compute_of(entry.recipe, scale) for entry in entries}
    first = entries[0].name
    for name, total in totals.items():
        if total != totals[first]:
            raise UserInputError(
                f"unequal compute: {first} trains {totals[first]:,} samples (steps x batch), "
                f"{name} {total:,} samples; make them equal or pass --allow-unequal"
            )


def check_names(entries: Sequence[Entry]) -> None:
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserInputError(f"two recipes share the name {repeated[0]!r}: names key the runs")


def train_runs(runs: Sequence[PlannedRun], *, jobs: int = 1, progress: bool = True) -> None:
    """Train every unfinished run, `jobs` at a time, each in its own `distill run` process with
    CPUs / jobs threads (small models train faster as parallel single-threaded processes than as
    one process on every core). A run that fails stops the comparison, naming its log."""
    # Longest first: a long run started last would train alone on one core at the end.
    todo = sorted((run for run in runs if not run.finished), key=lambda run: -run.compute)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    bar = tqdm(
        total=len(runs),
        initial=len(runs) - len(todo),
        desc="runs",
        unit="run",
        disable=not progress,
    )
    failures: list[str] = []

    def train(run: PlannedRun) -> None:
        if failures:
            return
        code = _train_one(run, threads)
        if code != 0:
            failures.append(f"{run.key} exited with {code}; see {run.log}")
        bar.update(1)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(train, todo))
    bar.close()
    if failures:
        raise RunFailed(failures[0])


class RunFailed(RuntimeError):
    """A run of the comparison exited with an error."""


def _train_one(run: PlannedRun, threads: int) -> int:
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "cli",
        "run",
        str(run.entry.path),
        *run.overrides(),
        "--no-progress",
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with run.log.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
