"""Report: both rows in the table, reasons for missing metrics, n for every number, the grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from eval.protocols import BK_SDM_COCO30K
from eval.report import ReportRow, make_comparison_grid, markdown_table, write_report
from eval.results import MetricResult


def rows() -> list[ReportRow]:
    teacher = {
        "fid": MetricResult(12.5, 100, "seeds 0..99"),
        "clip": MetricResult.missing("no CLIP model given"),
        "params": MetricResult(859_520_964.0, None, "UNet parameters"),
    }
    student = {"fid": MetricResult(14.25, 100, "seeds 0..99"), "params": MetricResult(579e6)}
    return [ReportRow("teacher", teacher), ReportRow("student", student)]


def test_report_has_both_rows_reasons_and_sample_sizes(tmp_path: Path) -> None:
    data = write_report(tmp_path, rows(), settings={"seed": 0})
    report = (tmp_path / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| teacher | 12.50 | unavailable: no CLIP model given |")
    assert table[2].startswith("| student | 14.25 |")
    assert "859.5M" in table[1] and "579M" in table[2]
    assert "**FID ↓**, teacher: n=100; seeds 0..99" in report
    assert json.loads((tmp_path / "metrics.json").read_text()) == data
    assert data["rows"][0]["metrics"]["clip"]["unavailable"] == "no CLIP model given"


def test_bk_sdm_published_numbers_become_reference_rows() -> None:
    table = markdown_table([result.as_report_row() for result in BK_SDM_COCO30K.published])
    assert "| SD v1.4 (published) | 13.05 | 0.2958 | 36.76 |" in table
    assert "| BK-SDM-Base (published) | 15.76 | 0.2878 | 33.79 |" in table


def test_comparison_grid_puts_teacher_above_student(tmp_path: Path) -> None:
    red, blue = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    grid = make_comparison_grid([red, red, red], [blue, blue, blue], ["cat", "dog", "a long label"])
    label_height = 14
    assert grid.height == label_height + 2 * 16
    array = np.asarray(grid)
    right_column = array[:, -8]  # the middle of the last column, top to bottom
    assert tuple(right_column[label_height + 8]) == (255, 0, 0)  # teacher row
    assert tuple(right_column[label_height + 16 + 8]) == (0, 0, 255)  # student row
