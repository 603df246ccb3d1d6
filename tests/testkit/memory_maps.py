"""What backs a tensor's memory, read from `/proc/self/smaps` (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _is_header(line: str) -> bool:
    """A mapping's first line ("start-end perms offset dev inode [path]"), not a "Key: value"."""
    first = line.split(maxsplit=1)[0]
    return "-" in first and not first.endswith(":")


def _mapping_of(tensor: torch.Tensor) -> tuple[list[str], list[str]]:
    """(header fields, field lines) of the `/proc/self/smaps` entry holding `tensor`'s data."""
    address = tensor.data_ptr()
    with open("/proc/self/smaps") as smaps:
        lines = smaps.read().splitlines()
    for index, line in enumerate(lines):
        if not _is_header(line):
            continue
        start, end = (int(bound, 16) for bound in line.split(maxsplit=1)[0].split("-"))
        if start <= address < end:
            fields = []
            for field in lines[index + 1 :]:
                if _is_header(field):
                    break
                fields.append(field)
            return line.split(maxsplit=5), fields
    raise AssertionError(f"no mapping holds address {address:#x}")


def resident_bytes(tensor: torch.Tensor) -> int:
    """How much of the mapping that holds `tensor` is resident in this process (its `Rss`)."""
    rss = next(line for line in _mapping_of(tensor)[1] if line.startswith("Rss:"))
    return int(rss.split()[1]) * 1024


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file behind the mapping that holds `tensor`'s data (None: anonymous memory; a
    pseudo-path such as "[heap]" otherwise)."""
    header = _mapping_of(tensor)[0]
    return header[5].strip() if len(header) == 6 else None


def in_unlinked_file(tensor: torch.Tensor, directory: Path) -> bool:
    """Whether `tensor` lives in a map of a file made in `directory` and unlinked since."""
    name = mapped_file(tensor) or ""
    return name.startswith(os.path.realpath(directory)) and name.endswith("(deleted)")
