"""On-disk format of a latent cache folder, and the atomic writes that keep it trustworthy.

    <cache_root>/latents-<key>/
        shard-<source_start:012d>.safetensors   samples encoded from source rows [start, end)
        empty_text.safetensors                  the "" prompt's embedding (classifier-free dropout)
        meta.json                               written LAST: its presence means "complete"

Every file is written to a temporary name and `os.replace`d into place, so a crash leaves either
the old state or the new one, never half a file. A folder without meta.json is an unfinished build:
its shards are complete units (each records the source rows it covers and what it skipped), so the
next build resumes after the last contiguous one.

Shard tensors (N samples, V = 2 variants [original, flipped] with random_flip else 1, K unique
captions in the shard, L tokens, D hidden size):
    latent_mean     (N, V, C, h, w)   mean of the VAE posterior, unscaled
    latent_std      (N, V, C, h, w)   its standard deviation
    text_slot       (N,)  int64       row of `text_embedding` holding the sample's caption
    text_embedding  (K, L, D)         text encoder `last_hidden_state`, one row per unique caption
    source_index    (N,)  int64       row of the source dataset
Captions are de-duplicated per shard: a class-captioned dataset (Fashion-MNIST: 10 classes × 3
templates) would otherwise store 60,000 copies of 30 embeddings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# 2: skips counted by reason (unreadable row or image, missing or empty caption).
FORMAT_VERSION = 2
META_FILE = "meta.json"
EMPTY_TEXT_FILE = "empty_text.safetensors"
SHARD_GLOB = "shard-*.safetensors"
SKIP_REASONS = ("unreadable_row", "unreadable_image", "missing_caption", "empty_caption")


def shard_name(source_start: int) -> str:
    return f"shard-{source_start:012d}.safetensors"


@dataclass(frozen=True)
class ShardInfo:
    """What one shard file covers: source rows [source_start, source_end), `count` kept samples."""

    file: str
    count: int
    source_start: int
    source_end: int
    skipped: dict[str, int] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata must be str → str."""
        return {
            "format": str(FORMAT_VERSION),
            "count": str(self.count),
            "source_start": str(self.source_start),
            "source_end": str(self.source_end),
            "skipped": json.dumps(self.skipped, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, file: str, metadata: dict[str, str]) -> ShardInfo:
        return cls(
            file=file,
            count=int(metadata["count"]),
            source_start=int(metadata["source_start"]),
            source_end=int(metadata["source_end"]),
            skipped=json.loads(metadata["skipped"]),
        )


def _temporary_path(path: Path) -> Path:
    # The pid keeps two writers (which the build lock should prevent) from sharing a temp file.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    temporary = _temporary_path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    temporary = _temporary_path(path)
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, path)


def remove_temporary_files(folder: Path) -> None:
    """Leftovers of a crashed writer (only call while holding the build lock)."""
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def read_shard_info(path: Path) -> ShardInfo | None:
    """The shard's own record of what it covers, or None if the file is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return ShardInfo.from_metadata(path.name, handle.metadata() or {})
    except (OSError, SafetensorError, KeyError, ValueError):  # damaged file or foreign metadata
        return None


def contiguous_shards(folder: Path) -> list[ShardInfo]:
    """The shards that cover source rows 0..k without a gap, in order; any other shard file (a
    gap, an overlap, unreadable) is deleted so a resumed build cannot double-count rows."""
    infos, unusable = [], []
    for path in folder.glob(SHARD_GLOB):
        info = read_shard_info(path)
        (infos if info is not None else unusable).append(info or path.name)
    infos.sort(key=lambda info: info.source_start)
    kept, next_start = [], 0
    for info in infos:
        if info.source_start == next_start and info.source_end > info.source_start:
            kept.append(info)
            next_start = info.source_end
        else:
            unusable.append(info.file)
    for name in unusable:
        (folder / name).unlink(missing_ok=True)
    return kept


def read_meta(folder: Path) -> dict[str, Any] | None:
    """meta.json if the cache in `folder` is complete and intact, else None."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != FORMAT_VERSION or not (folder / EMPTY_TEXT_FILE).is_file():
        return None
    if not all((folder / shard["file"]).is_file() for shard in meta.get("shards", [])):
        return None
    return meta
