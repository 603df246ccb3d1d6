"""What backs a tensor's memory, read from `/proc/self/maps` (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _mapping_of(tensor: torch.Tensor) -> tuple[str, list[str]] | None:
    """(header line, field lines) of the `/proc/self/smaps` entry that holds `tensor`'s data."""
    address = tensor.data_ptr()
    with open("/proc/self/smaps") as smaps:
        lines = smaps.read().splitlines()
    for index, line in enumerate(lines):
        first = line.split(maxsplit=1)[0]
        if "-" not in first or ":" in first:
            continue  # a field line, not a mapping's header
        start, end = (int(bound, 16) for bound in first.split("-"))
        if start <= address < end:
            fields = []
            for field in lines[index + 1 :]:
                if "-" in field.split(maxsplit=1)[0] and ":" not in field.split(maxsplit=1)[0]:
                    break
                fields.append(field)
            return line, fields
    return None


def resident_bytes(tensor: torch.Tensor) -> int:
    """How much of the mapping that holds `tensor` is resident in this process (its `Rss`)."""
    mapping = _mapping_of(tensor)
    assert mapping is not None
    rss = next(line for line in mapping[1] if line.startswith("Rss:"))
    return int(rss.split()[1]) * 1024


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file behind the mapping that holds `tensor`'s data (None: anonymous memory)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def in_unlinked_file(tensor: torch.Tensor, directory: Path) -> bool:
    """Whether `tensor` lives in a map of a file made in `directory` and unlinked since."""
    name = mapped_file(tensor) or ""
    return name.startswith(os.path.realpath(directory)) and name.endswith("(deleted)")
