"""Read a finished latent cache: samples as the training step consumes them.

Training steps run neither the VAE encoder nor (for the cache) anything but a table lookup: a step
reads the VAE posterior (mean, log-variance) and the caption's token ids, draws
z = (mean + std·ε)·scaling_factor (`sample_latents`), and the text encoder runs on the ids.
Storing the distribution, not one sample, keeps that draw exact: every epoch sees fresh posterior
noise, as when encoding on the fly. Building a cache is `distill.data.build`; the format is
`distill.data.shards`.

Reads go through safetensors' memory map, shard by shard, so opening a cache of 200k pairs costs
what opening one of 2k does (`benchmarks/encode_throughput.py --growth`), and DataLoader workers
share the page cache.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load_file

from core.errors import UserInputError
from distill.data.shards import (
    CAPTION_PREFIX,
    EMPTY_CAPTION_FILE,
    META_FILE,
    SAMPLE_PREFIX,
    read_meta,
    shard_name,
)

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- pure functions


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """One draw from the cached VAE posterior, scaled for the UNet: (mean + std·ε − shift)·scale.

    mean, std: (B, C, h, w) as cached. Equals diffusers' `DiagonalGaussianDistribution.sample()`
    followed by the training scripts' `latents * vae.config.scaling_factor` (SD v1: 0.18215, no
    shift; SD3/FLUX VAEs also subtract `shift_factor`). `randn_tensor` draws on the generator's
    device and moves, so a CPU generator gives the same noise on any device.
    """
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * noise
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014): a well-mixed 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_choice(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is shown flipped in `epoch`: a fair coin that is a pure function of
    (seed, epoch, index). DataLoader workers need no shared RNG state, and a run resumed mid-epoch
    sees exactly the flips it would have seen."""
    return bool(_splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ index) >> 63)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CachedBatch:
    """A training batch as the cache stores it, before noising (`distill.step.noise_batch`)."""

    latent_mean: torch.Tensor  # (B, C, h, w) VAE posterior mean, unscaled, fp32
    latent_std: torch.Tensor  # (B, C, h, w) fp32
    conditioning: dict[str, torch.Tensor]  # caption fields, e.g. input_ids (B, L) int32


class LatentCache(torch.utils.data.Dataset):
    """A finished cache as a map-style dataset.

    `cache[i]` → {"latent_mean", "latent_std": (C, h, w) fp32, the caption fields (e.g.
    "input_ids": (L,)), "index": i, "source_index": row in the source dataset, "flipped"}. With
    two variants stored, which one `cache[i]` returns is `flip_choice(seed, epoch, i)`: call
    `set_epoch` each epoch. `item(i, variant)` picks a variant explicitly, `shown(i, epoch)` the
    one an epoch shows.
    """

    def __init__(self, folder: str | Path, *, seed: int = 0) -> None:
        self.folder = Path(folder)
        meta = read_meta(self.folder)
        if meta is None:
            raise UserInputError(
                f"{str(self.folder)!r} holds no complete latent cache (no valid {META_FILE}: "
                "an unfinished build?)"
            )
        self.meta = meta
        self.seed = seed
        self.epoch = 0
        used = [shard for shard in meta["shards"] if shard["count"]]
        self._shard_files = [self.folder / shard_name(shard["index"]) for shard in used]
        counts = [shard["count"] for shard in used]
        self._shard_starts = [sum(counts[:k]) for k in range(len(counts))]
        if sum(counts) != meta["count"]:
            raise UserInputError(f"latent cache {str(self.folder)!r} is damaged; delete it")
        self._handles: dict[int, Any] = {}
        self._handles_pid = os.getpid()
        empty = load_file(str(self.folder / EMPTY_CAPTION_FILE))
        self._empty = {k[len(CAPTION_PREFIX) :]: v for k, v in empty.items()}
        self._sample_fields = list(meta.get("sample_fields", []))

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def num_variants(self) -> int:
        return self.meta["num_variants"]

    @property
    def skipped(self) -> dict[str, int]:
        """Rows left out while building, by reason (`SKIP_REASONS`): {"empty_caption": n, ...}."""
        return dict(self.meta["skipped"])

    @property
    def key(self) -> str:
        """The hash of everything its numbers depend on (`distill.data.build`), its name."""
        return self.meta["key"]

    @property
    def bytes_per_pair(self) -> float:
        return self.meta["bytes"] / self.meta["count"]

    @property
    def empty_conditioning(self) -> dict[str, torch.Tensor]:
        """The empty prompt's caption fields (no batch axis): classifier-free dropout's input."""
        return dict(self._empty)

    @property
    def scaling_factor(self) -> float | None:
        """The VAE's `scaling_factor` (for `sample_latents`)."""
        return self.meta["scaling_factor"]

    @property
    def shift_factor(self) -> float | None:
        return self.meta["shift_factor"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.shown(index, self.epoch)

    def shown(self, index: int, epoch: int) -> dict[str, torch.Tensor]:
        """Sample `index` as epoch `epoch` shows it: flipped when `flip_choice` says so."""
        flipped = self.num_variants == 2 and flip_choice(self.seed, epoch, index)
        return self.item(index, variant=int(flipped))

    def batch(self, samples: Sequence[tuple[int, int]]) -> CachedBatch:
        """The (index, epoch) samples, stacked."""
        items = [self.shown(index, epoch) for index, epoch in samples]
        return CachedBatch(
            latent_mean=torch.stack([item["latent_mean"] for item in items]),
            latent_std=torch.stack([item["latent_std"] for item in items]),
            conditioning={
                name: torch.stack([item[name] for item in items])
                for name in [*self._empty, *self._sample_fields]
            },
        )

    def micro_batch(self, samples: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """`batch` as the stage rows of a training loader (`distill.kinds.StageRows`)."""
        batch = self.batch(samples)
        return {
            "latent_mean": batch.latent_mean,
            "latent_std": batch.latent_std,
            "conditioning": batch.conditioning,
        }

    def item(self, index: int, variant: int = 0) -> dict[str, torch.Tensor]:
        """Sample `index` in variant `variant` (0 original, 1 flipped when stored)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)}")
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} not stored (cache has {self.num_variants})")
        shard = bisect.bisect_right(self._shard_starts, index) - 1
        row = index - self._shard_starts[shard]
        handle = self._handle(shard)
        slot = int(handle.get_slice("text_slot")[row])
        logvar = handle.get_slice("latent_logvar")[row][variant].float()
        item = {
            "latent_mean": handle.get_slice("latent_mean")[row][variant].float(),
            # diffusers' DiagonalGaussianDistribution: std = exp(logvar / 2)
            "latent_std": torch.exp(0.5 * logvar),
            "index": torch.tensor(index),
            "source_index": handle.get_slice("source_index")[row].clone(),
            "flipped": torch.tensor(variant == 1),
        }
        for name in self._empty:
            item[name] = handle.get_slice(f"{CAPTION_PREFIX}{name}")[slot].clone()
        for name in self._sample_fields:
            item[name] = handle.get_slice(f"{SAMPLE_PREFIX}{name}")[row].clone()
        return item

    def _handle(self, shard: int) -> Any:
        if self._handles_pid != os.getpid():  # forked into a DataLoader worker: reopen
            self._handles, self._handles_pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._shard_files[shard]), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not pickle (spawned DataLoader workers)
        return state
