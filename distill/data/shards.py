"""On-disk format of a latent cache folder, and the atomic writes that keep it trustworthy.

    <cache_root>/latents-<key>/
        shard-<k:06d>.safetensors     the usable samples of source rows [k·S, (k+1)·S)
        empty_caption.safetensors     the "" prompt's caption fields (classifier-free dropout)
        done-<rank>-of-<world>.json   written by each encoding process when its shards are done
        meta.json                     written LAST, by one process: its presence means "complete"

Shard k always covers the same S source rows (S = `rows_per_shard`), whoever encodes it: with W
processes, process r encodes the shards k with k mod W = r. So a cache built by 2 processes is,
file for file and byte for byte, the one built by 1, and after a kill every finished shard is
kept (each file is written to a temporary name and renamed into place, so it is whole or absent).

Shard tensors (N usable samples, V = 2 variants [original, flipped] with random_flip else 1, K
unique captions in the shard, L tokens):
    latent_mean        (N, V, C, h, w)  mean of the VAE posterior, unscaled, in the cache dtype
    latent_logvar      (N, V, C, h, w)  its log-variance (std = exp(logvar / 2), as diffusers)
    text_slot          (N,)  int32      row of the caption fields holding the sample's caption
    caption.<field>    (K, L) int32     token ids (and masks) of each unique caption
    sample.<field>     (N, ...)         per-image conditioning, e.g. SDXL's size ids (N, 6)
    source_index       (N,)  int64      row of the source dataset
The log-variance keeps small spreads exact in 16 bits, where a 16-bit std would be subnormal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.atomic import atomic_path, write_text_atomic

# 3: token ids instead of text embeddings, log-variance, fixed row spans per shard, 16-bit option.
FORMAT_VERSION = 3
META_FILE = "meta.json"
EMPTY_CAPTION_FILE = "empty_caption.safetensors"
SHARD_GLOB = "shard-*.safetensors"
CAPTION_PREFIX = "caption."
SAMPLE_PREFIX = "sample."
SKIP_REASONS = ("unreadable_row", "unreadable_image", "missing_caption", "empty_caption")
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def done_marker(rank: int, world: int) -> str:
    return f"done-{rank}-of-{world}.json"


@dataclass(frozen=True)
class ShardInfo:
    """What one shard file covers: source rows [source_start, source_end), `count` kept."""

    index: int
    count: int
    source_start: int
    source_end: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return shard_name(self.index)

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata (str → str). One key holding sorted JSON: safetensors 0.x writes
        a metadata map in hash order, which would make two builds of one shard differ in bytes."""
        record = {"format": FORMAT_VERSION, **asdict(self)}
        return {"shard": json.dumps(record, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ShardInfo:
        record = json.loads(metadata["shard"])
        if record.pop("format") != FORMAT_VERSION:
            raise ValueError("a shard of another cache format")
        return cls(**record)


def write_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    # atomic_path's temporary name holds the pid: two writers of one shard (two runs building
    # one cache) never collide.
    with atomic_path(path) as temporary:
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(temporary), metadata=metadata)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_shard_info(path: Path) -> ShardInfo | None:
    """The shard's own record of what it covers, or None if the file is unreadable or foreign."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return ShardInfo.from_metadata(handle.metadata() or {})
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def read_meta(folder: Path) -> dict[str, Any] | None:
    """meta.json if the cache in `folder` is complete and of this format, else None."""
    meta = read_json(folder / META_FILE)
    if meta is None or meta.get("format") != FORMAT_VERSION:
        return None
    if not (folder / EMPTY_CAPTION_FILE).is_file():
        return None
    if not all((folder / shard_name(shard["index"])).is_file() for shard in meta.get("shards", [])):
        return None
    return meta
