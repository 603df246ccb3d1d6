"""Captions of an image folder (`metadata.jsonl` / `metadata.csv`), read row by row.

datasets 5.2's `imagefolder` parses metadata.jsonl with pyarrow's JSON reader, which infers one
type per column and refuses the whole folder when one caption in two million is a number or a
list ("Column(/text) changed from string to number in row 29"). Here each line is parsed on its
own: every value becomes text whatever its JSON type (3 -> "3", [1, 2] -> "[1, 2]"), null and
missing values stay None, and a line that is not JSON becomes a row with no image and no caption.
The cache then skips and counts those rows (missing or empty caption, unreadable image or row),
so one bad row costs one row.

The rows keep imagefolder's layout: a metadata file describes the images of its own folder
(`file_name` relative to it), and several folders may each have one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import datasets

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"
# A changed image must change the dataset's fingerprint (and so the cache key): datasets hashes
# the table's content, and this column carries each file's size and mtime into it.
SIGNATURE_COLUMN = "__file_signature"


def metadata_files(folder: Path) -> list[Path]:
    return sorted(p for name in METADATA_NAMES for p in folder.rglob(name) if p.is_file())


def caption_folder_dataset(folder: Path) -> datasets.Dataset:
    """Rows `image` (path, decoded lazily by datasets' Image feature) plus every metadata column
    as text or None, from every metadata file below `folder`."""
    rows: list[dict[str, Any]] = []
    for metadata in metadata_files(folder):
        rows += [_resolve(row, metadata.parent) for row in _read_rows(metadata)]
    columns = sorted({key for row in rows for key in row} - {"image", SIGNATURE_COLUMN})
    table = {
        "image": [row.get("image") for row in rows],
        SIGNATURE_COLUMN: [row.get(SIGNATURE_COLUMN) for row in rows],
        **{column: [row.get(column) for row in rows] for column in columns},
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            SIGNATURE_COLUMN: datasets.Value("string"),
            **{column: datasets.Value("string") for column in columns},
        }
    )
    return datasets.Dataset.from_dict(table, features=features)


def as_text(value: Any) -> str | None:
    """A metadata value as text: strings as they are, None as None, anything else as its JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _read_rows(metadata: Path) -> list[dict[str, str | None]]:
    if metadata.suffix == ".csv":
        with open(metadata, newline="", encoding="utf-8", errors="replace") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    rows = []
    with open(metadata, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            # A line that is not a JSON object is kept as an empty row: skipped and counted later.
            rows.append(
                {k: as_text(v) for k, v in record.items()} if isinstance(record, dict) else {}
            )
    return rows


def _resolve(row: dict[str, str | None], base: Path) -> dict[str, Any]:
    """The row with `file_name` turned into the image path (None when absent or missing)."""
    name = row.pop(FILE_COLUMN, None)
    path = base / name if name else None
    row["image"] = str(path) if path is not None and path.is_file() else None
    if path is not None and path.is_file():
        stat = path.stat()
        row[SIGNATURE_COLUMN] = f"{name}:{stat.st_size}:{stat.st_mtime_ns}"
    return row
