"""Randomness of training as a pure function of (seed, stage, position in the sample stream).

Training consumes one stream of samples per stage. Every random draw for the sample at stream
position p (its VAE posterior draw, noise, timestep, classifier-free dropout) comes from a
generator seeded by (seed, stage, p), and the data order is one seeded permutation per epoch
(which flip a sample shows is a pure function of (seed, epoch, index) in the cache). Hence:

- resuming needs no saved RNG state: step k after a restart draws what it would have drawn;
- the run does not depend on how the global batch is split: 2 processes with batch 2 draw
  exactly what 1 process with batch 4 draws, so multi-process training is testable on one CPU.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch


def derived_seed(*coordinates: int) -> int:
    """A 63-bit seed from integer coordinates (no correlation between neighbouring steps)."""
    digest = hashlib.blake2b(repr(coordinates).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, stage: int, position: int) -> torch.Generator:
    """The generator for every random draw about the sample at stream position `position`."""
    generator = torch.Generator()
    generator.manual_seed(derived_seed(seed, stage, position, 0x5EED))
    return generator


class StreamSample(NamedTuple):
    position: int  # place in the stage's sample stream (epoch * N + offset)
    index: int  # row of the cache
    epoch: int


def epoch_permutation(num_samples: int, seed: int, stage: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator()
    generator.manual_seed(derived_seed(seed, stage, epoch, 0xDA7A))
    return torch.randperm(num_samples, generator=generator)


class EpochOrder:
    """Sample indices of the micro-batch at any position, in seeded per-epoch permutations.

    Position p of the global sample stream is sample `perm(epoch = p // N)[p % N]`. A global batch
    covers `batch_size * world_size` consecutive positions; rank r takes its own contiguous slice,
    so processes never see the same sample in a step.
    """

    def __init__(self, num_samples: int, seed: int, stage: int) -> None:
        if num_samples < 1:
            raise ValueError("no samples to train on")
        self.num_samples, self.seed, self.stage = num_samples, seed, stage
        self._cached: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (
                epoch,
                epoch_permutation(self.num_samples, self.seed, self.stage, epoch),
            )
        return self._cached[1]

    def batch(
        self, micro_batch_index: int, batch_size: int, world_size: int = 1, rank: int = 0
    ) -> list[StreamSample]:
        """This rank's `batch_size` samples of global micro-batch k (a contiguous slice)."""
        start = (micro_batch_index * world_size + rank) * batch_size
        n = self.num_samples
        return [
            StreamSample(p, int(self._permutation(p // n)[p % n]), p // n)
            for p in range(start, start + batch_size)
        ]
