"""What backs a tensor's memory, read from `/proc/self/maps` (Linux)."""

from __future__ import annotations

from pathlib import Path

import torch


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
    return name.startswith(str(directory)) and name.endswith("(deleted)")
