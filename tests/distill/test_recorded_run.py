"""The recorded run's tolerance is tight enough to catch a real change.

`test_trainer.test_seeded_run_logs_the_recorded_terms` compares the whole seeded run with its
record at `testkit.recorded_run.RELATIVE_TOLERANCE`, 50x the drift that other CPU code paths
cause in float64. Here the first two stages run again with one realistic change each (to the
noising, the data order, a loss, the optimizer), and the same comparison must fail; unchanged, it
must pass, so the failures are the changes' doing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

import distill.step_randomness
from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from testkit.recorded_run import load_record, logged_records, mismatches, recorded_values
from testkit.tiny_world import recorded_recipe

pytestmark = pytest.mark.e2e  # five seeded runs: `make test-e2e`

STAGES = 2  # denoise (task) and soft_labels (task + output KD): 6 of the record's 11 steps


def _timesteps_off_by_one(monkeypatch, raw: dict) -> None:
    """Noising: every sample noised at t + 1 instead of t (the classic off-by-one)."""
    add_noise = DDPMScheduler.add_noise

    def shifted(self, samples, noise, timesteps):
        return add_noise(self, samples, noise, (timesteps + 1).clamp(max=999))

    monkeypatch.setattr(DDPMScheduler, "add_noise", shifted)


def _two_samples_swapped(monkeypatch, raw: dict) -> None:
    """Data order: the first two samples of every epoch's permutation trade places."""
    permutation = distill.step_randomness.epoch_permutation

    def swapped(*args):
        order = permutation(*args).clone()
        order[[0, 1]] = order[[1, 0]]
        return order

    monkeypatch.setattr(distill.step_randomness, "epoch_permutation", swapped)


def _soft_labels_reweighted(monkeypatch, raw: dict) -> None:
    """A loss: stage 2's output-KD weight 1.0 -> 1.1."""
    raw["stages"][1]["losses"]["output_kd"]["weight"] = 1.1


def _adam_beta2(monkeypatch, raw: dict) -> None:
    """The optimizer: AdamW's beta2 0.999 -> 0.99."""
    raw["training"]["adam_betas"] = [0.9, 0.99]


MUTATIONS: dict[str, Callable] = {
    "noising": _timesteps_off_by_one,
    "data order": _two_samples_swapped,
    "a loss": _soft_labels_reweighted,
    "the optimizer": _adam_beta2,
}


def _first_stages(tmp_path: Path, teachers: dict[str, Path], mutate=None, monkeypatch=None):
    raw = recorded_recipe(tmp_path, teachers)
    raw["stages"] = raw["stages"][:STAGES]
    raw["training"]["validation_prompts"] = []  # grids do not change the terms
    if mutate is not None:
        mutate(monkeypatch, raw)
    DistillationTrainer(validate_recipe(raw), progress=False).train()
    actual = recorded_values(logged_records(Path(raw["output_dir"])))
    return mismatches(load_record()[: len(actual)], actual)


def test_the_first_stages_unchanged_reproduce_the_record(teachers, tmp_path: Path) -> None:
    assert _first_stages(tmp_path, teachers) == []


@pytest.mark.parametrize("change", list(MUTATIONS))
def test_a_real_change_fails_the_recorded_run(
    change: str, teachers, tmp_path: Path, monkeypatch
) -> None:
    torch.manual_seed(0)
    problems = _first_stages(tmp_path, teachers, MUTATIONS[change], monkeypatch)
    assert problems, f"changing {change} left every recorded value within the tolerance"
