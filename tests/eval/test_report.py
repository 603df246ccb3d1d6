"""Report: both rows in the table, n/a with footnotes, intervals, n for every number, the grid,
and the fingerprints a model card checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from core.image_grid import CAPTION_HEIGHT, image_grid
from eval.protocols import BK_SDM_COCO30K
from eval.report import (
    ReportRow,
    markdown_table,
    metrics_fingerprints,
    write_report,
)
from eval.results import MetricResult

NO_CLIP = "no CLIP model given"


def rows() -> list[ReportRow]:
    teacher = {
        "fid": MetricResult(12.5, 100, "seeds 0..99", interval=(11.0, 14.25)),
        "clip": MetricResult.missing(NO_CLIP, detail="pass --clip-model"),
        "is": MetricResult.missing("no Inception classifier head offline"),
        "params": MetricResult(859_520_964.0, None, "UNet parameters"),
    }
    student = {
        "fid": MetricResult(14.25, 100, "seeds 0..99"),
        "clip": MetricResult.missing(NO_CLIP, detail="pass --clip-model"),
        "params": MetricResult(579e6),
    }
    return [
        ReportRow("teacher", teacher, fingerprint="a" * 64),
        ReportRow("student", student, fingerprint="b" * 64),
    ]


def test_report_has_both_rows_footnoted_reasons_and_sample_sizes(tmp_path: Path) -> None:
    data = write_report(tmp_path, rows(), settings={"seed": 0}, notes=["n = 100 images."])
    report = (tmp_path / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| teacher | 12.50 [11.00, 14.25] | n/a¹ | n/a² |")
    assert table[2].startswith("| student | 14.25 | n/a¹ | — |")  # no IS result at all: —
    assert "859.5M" in table[1] and "579M" in table[2]
    # One footnote per reason, naming every row it covers; reasons stay out of the cells.
    assert f"¹ CLIP ↑ (cosine), teacher, student: {NO_CLIP} (pass --clip-model)" in report
    assert "² IS (Inception) ↑, teacher: no Inception classifier head offline" in report
    assert NO_CLIP not in "\n".join(table)
    assert "**FID ↓ [95% interval]**, teacher: n=100; seeds 0..99" in report
    assert "n = 100 images." in report
    assert json.loads((tmp_path / "metrics.json").read_text()) == data
    assert data["rows"][0]["metrics"]["clip"]["unavailable"] == NO_CLIP
    assert data["rows"][0]["metrics"]["fid"]["interval"] == [11.0, 14.25]


def test_rows_round_trip_through_metrics_json(tmp_path: Path) -> None:
    data = write_report(tmp_path, rows())
    loaded = json.loads((tmp_path / "metrics.json").read_text())
    again = [ReportRow.from_dict(row) for row in loaded["rows"]]
    assert again[0].metrics["fid"].interval == (11.0, 14.25)
    assert markdown_table(again) == markdown_table(rows())
    assert data["fingerprints"] == {"teacher": "a" * 64, "student": "b" * 64}


def test_metrics_fingerprints_name_the_weights_behind_each_row() -> None:
    data = {"rows": [row.to_dict() for row in rows()]}
    data["rows"].append(BK_SDM_COCO30K.published[0].as_report_row().to_dict())
    assert metrics_fingerprints(data) == {"teacher": "a" * 64, "student": "b" * 64}
    # A metrics.json written before fingerprints existed vouches for no weights at all.
    old = {"rows": [{"name": "student", "metrics": {}}]}
    assert metrics_fingerprints(old) == {} and metrics_fingerprints({}) == {}


def test_optional_columns_appear_only_when_some_row_has_them() -> None:
    plain = markdown_table(rows())
    assert "fidelity FID" not in plain and "in-domain" not in plain
    with_extra = rows()
    with_extra[1].metrics["fidelity_fid"] = MetricResult(25.0, 100, "", interval=(23.0, 27.5))
    with_extra[1].metrics["class_accuracy"] = MetricResult(0.815, 100, "in-domain")
    table = markdown_table(with_extra)
    assert "| fidelity FID ↓ (to teacher) |" in table and "| class acc. (in-domain) ↑ |" in table
    assert "| 25.00 [23.00, 27.50] |" in table and "| 81.5% |" in table


def test_bk_sdm_published_numbers_become_reference_rows() -> None:
    table = markdown_table([result.as_report_row() for result in BK_SDM_COCO30K.published])
    assert "| SD v1.4 (published) | 13.05 | 0.2958 | 36.76 |" in table
    assert "| BK-SDM-Base (published) | 15.76 | 0.2878 | 33.79 |" in table


def test_grid_labels_rows_and_enlarges_small_images_by_whole_factors(tmp_path: Path) -> None:
    red, blue = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    grid = image_grid(
        [[red, red, red], [blue, blue, blue]],
        row_labels=["teacher", "student"],
        column_labels=["cat", "dog", "a long label"],
        pad=0,
    )
    tile = 128  # 16 px x 8, nearest-neighbour: sharp squares a person can judge
    assert grid.height == CAPTION_HEIGHT + 2 * tile
    array = np.asarray(grid)
    right_column = array[:, -tile // 2]  # the middle of the last column, top to bottom
    assert tuple(right_column[CAPTION_HEIGHT + tile // 2]) == (255, 0, 0)  # teacher row
    assert tuple(right_column[CAPTION_HEIGHT + tile + tile // 2]) == (0, 0, 255)  # student row
    assert (array[:, : grid.width - 3 * tile] < 128).any()  # the row labels are drawn
    large = Image.new("RGB", (256, 256), "red")
    assert image_grid([[large]], pad=0).size == (256, 256)  # never shrunk, never enlarged
