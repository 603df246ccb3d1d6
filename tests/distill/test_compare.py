"""`distill compare` on the tiny world: two one-stage recipes, two seeds each, really trained (one
`distill run` process per run) and really scored (Inception features, the Fashion-MNIST judge)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cli import main
from distill.compare import parse_entry, plan_runs, train_runs
from distill.compare_scoring import score_comparison
from eval.comparison_report import METRICS, write_report
from offline.fashion_classifier import ClassifierSettings
from testkit.tiny_world import tiny_recipe

JUDGE = ClassifierSettings(max_train_samples=2_000)  # a judge, not a good one: seconds to train
NUM_IMAGES = 8


def _write_recipes(tmp_path: Path, teachers: dict[str, Path]) -> list[Path]:
    raw = tiny_recipe(tmp_path, teachers)
    task, kd = raw["stages"][0], raw["stages"][1]
    files = []
    for name, stage in (("toy_task", task), ("toy_kd", {**kd, "gradient_accumulation": 1})):
        recipe = {**raw, "name": name, "stages": [{**stage, "steps": 2}]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        files.append(path)
    return files


def _reference_folder(folder: Path) -> Path:
    from offline.fashion_mnist import load_fashion_mnist_arrays

    images, _ = load_fashion_mnist_arrays("test")  # (10000, 28, 28) uint8
    folder.mkdir()
    for i in range(16):
        Image.fromarray(images[i]).resize((32, 32)).save(folder / f"{i:03d}.png")
    return folder


# Four trained and scored runs (~50 s on 2 cores): the tests that read them run with the end-to-end
# chains (`make test-e2e`), keeping `make test` under its 4 minutes.
@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory, teachers: dict[str, Path]):
    root = tmp_path_factory.mktemp("compare")
    entries = [parse_entry(str(path)) for path in _write_recipes(root, teachers)]
    out = root / "out"
    runs = plan_runs(entries, [0, 1], Fraction(1), out)
    train_runs(runs, jobs=2, progress=False)
    reference = _reference_folder(root / "reference")

    def score():
        report = score_comparison(
            runs,
            entries,
            teacher=str(teachers["b"]),
            out_dir=out,
            scale=Fraction(1),
            baseline="toy_task",
            curve=None,
            protocol_name="fashion",
            reference=str(reference),
            num_images=NUM_IMAGES,
            resamples=50,
            batch_size=NUM_IMAGES,
            progress=False,
            judge_settings=JUDGE,
        )
        write_report(report, out)
        return json.loads((out / "comparison.json").read_text())

    return runs, out, score, score()


@pytest.mark.e2e
def test_every_cell_is_in_the_json(comparison) -> None:
    runs, out, _, data = comparison
    assert [entry["name"] for entry in data["recipes"]] == ["toy_task", "toy_kd"]
    for entry in data["recipes"]:
        assert entry["compute"] == 2 * 4 and entry["seeds"] == [0, 1]
        for row in entry["runs"]:
            for metric in METRICS:
                assert np.isfinite(row[metric.key]), (entry["name"], row)
        for metric in METRICS:
            summary = entry["summary"][metric.key]
            assert len(summary["values"]) == 2 and summary["spread"] is not None
        assert set(entry["vs_teacher"]) == {"fid", "class_accuracy"}
    assert set(data["recipes"][1]["vs_baseline"]) == {m.key for m in METRICS}
    assert data["recipes"][0]["vs_baseline"] == {}  # the baseline itself
    assert (out / "comparison.md").is_file() and (out / "comparison.png").stat().st_size > 0
    # Two seeds, two recipes: four students, each its own weights.
    fingerprints = {row["fingerprint"] for e in data["recipes"] for row in e["runs"]}
    assert len(fingerprints) == 4


@pytest.mark.e2e
def test_paired_difference_is_the_mean_of_per_seed_differences(comparison) -> None:
    _, _, _, data = comparison
    base, other = data["recipes"]
    for metric in METRICS:
        per_seed = [
            b[metric.key] - a[metric.key] for a, b in zip(base["runs"], other["runs"], strict=True)
        ]
        difference = other["vs_baseline"][metric.key]
        assert difference["per_seed"] == pytest.approx(per_seed, abs=1e-12)
        assert difference["point"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        # The seed half-width by hand: t(0.975, 1 dof) = 12.706 times sd / sqrt(2).
        half = 12.7062047 * np.std(per_seed, ddof=1) / np.sqrt(2)
        assert difference["seed_half_width"] == pytest.approx(half, rel=1e-6)
        low, high = difference["interval"]
        assert (
            low <= difference["point"] - half + 1e-9 and high >= difference["point"] + half - 1e-9
        )


@pytest.mark.e2e
def test_a_rerun_after_an_interruption_reaches_the_same_report(comparison) -> None:
    runs, out, score, first = comparison
    # Interrupted after its last checkpoint, before the export: no pipeline, no report.
    interrupted = runs[-1]
    shutil.rmtree(interrupted.student_pipeline)
    (out / "comparison.json").unlink()
    assert not interrupted.finished and all(run.finished for run in runs[:-1])
    before = {run.key: run.log.stat().st_size for run in runs}
    train_runs(runs, jobs=2, progress=False)
    after = {run.key: run.log.stat().st_size for run in runs}
    assert [key for key in after if after[key] != before[key]] == [interrupted.key]
    assert score() == first


def test_unequal_compute_is_one_line_with_both_totals(
    tmp_path: Path, teachers: dict[str, Path], capsys
) -> None:
    task, kd = _write_recipes(tmp_path, teachers)
    raw = yaml.safe_load(kd.read_text())
    raw["stages"][0]["steps"] = 3
    kd.write_text(yaml.safe_dump(raw))
    code = main(["compare", str(task), str(kd), "--seeds", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "8 samples" in err and "12 samples" in err and "--allow-unequal" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_a_run_left_by_an_edited_recipe_is_not_reused(comparison, tmp_path: Path) -> None:
    runs, _, _, _ = comparison
    trained = runs[0]
    raw = yaml.safe_load(trained.entry.path.read_text())
    raw["stages"][0]["lr"] = 2e-3
    edited = tmp_path / trained.entry.path.name
    edited.write_text(yaml.safe_dump(raw))
    same_folder = replace(trained, entry=parse_entry(str(edited)))
    assert trained.finished and not same_folder.finished
