"""`training.report_to`: the loss terms reach the tracker the user chose, under RUN/logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distill.recipe import validate_recipe
from distill.trainer import DistillationTrainer
from testkit.tiny_world import tiny_recipe


def _one_stage(root: Path, teachers: dict[str, Path], report_to: str) -> dict:
    raw = tiny_recipe(root, teachers, report_to=report_to)
    raw["stages"] = [raw["stages"][1] | {"steps": 2, "gradient_accumulation": 1}]  # soft labels
    return raw


def test_wandb_offline_logs_every_term(
    teachers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = _one_stage(tmp_path, teachers, "wandb")
    DistillationTrainer(validate_recipe(raw), progress=False).train()

    logs = Path(raw["output_dir"]) / "logs"
    (run_file,) = (logs / "wandb").glob("offline-run-*/run-*.wandb")
    logged = _history_items(run_file.read_bytes())
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        for key in ("loss/task", "loss/output_kd", "loss/total", "lr", "grad_norm"):
            assert (f"soft_labels/{key}", record[key]) in logged, key
    assert not list(logs.rglob("events.out.tfevents.*"))  # wandb alone, as asked


def _history_items(data: bytes) -> set[tuple[str, float]]:
    """(key, value) of every history item in an offline wandb run file. wandb 0.31 has no public
    reader for it; a history item is the protobuf message HistoryItem {key = 2; value_json = 16},
    i.e. 0x12 <len> key 0x82 0x01 <len> json, which a short run's records hold verbatim."""
    items = set()
    for match in re.finditer(rb"\x12([\x01-\x7f])", data):
        start = match.end()
        key = data[start : start + match.group(1)[0]]
        rest = start + len(key)
        if data[rest : rest + 2] != b"\x82\x01" or rest + 3 > len(data):
            continue
        value = data[rest + 3 : rest + 3 + data[rest + 2]]
        try:
            items.add((key.decode(), float(json.loads(value))))
        except (UnicodeDecodeError, ValueError, TypeError):
            continue
    return items


def test_none_keeps_only_metrics_jsonl(teachers, tmp_path: Path) -> None:
    raw = _one_stage(tmp_path, teachers, "none")
    DistillationTrainer(validate_recipe(raw), progress=False).train()
    logs = Path(raw["output_dir"]) / "logs"
    assert [p.name for p in logs.iterdir()] == ["metrics.jsonl"]
    assert len((logs / "metrics.jsonl").read_text().splitlines()) == 2
