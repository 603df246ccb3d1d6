"""The training loader: this process's micro-batches, read from the cache ahead of the step.

Micro-batch k of a stage is a pure function of (seed, stage, k, world size, rank): `EpochOrder`
says which samples it holds, the stage's rows (the latent cache, or `ImageRows`) read them. So
the reads can run in DataLoader workers, any number of them, in any order, and a resumed stage
starts its loader at micro-batch `start_step · gradient_accumulation` without saved state:
results do not depend on the workers, and still not on the number of processes. The random draws
(posterior sample, noise, timestep, dropout) stay in the step, from generators seeded by each
sample's stream position.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from distill.step_randomness import EpochOrder

if TYPE_CHECKING:
    from distill.kinds import StageRows


class MicroBatches(torch.utils.data.Dataset):
    """Item i = this rank's micro-batch `first + i`: its rows' tensors (the latent cache's, or
    pixels) and the samples' stream positions."""

    def __init__(
        self,
        rows: StageRows,
        order: EpochOrder,
        *,
        batch_size: int,
        world_size: int,
        rank: int,
        first: int,
        count: int,
    ) -> None:
        self.rows, self.order = rows, order
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.first, self.count = first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        samples = self.order.batch(self.first + i, self.batch_size, self.world_size, self.rank)
        fields = self.rows.micro_batch([(s.index, s.epoch) for s in samples])
        return {"positions": torch.tensor([s.position for s in samples])} | fields  # (B,) int64


def micro_batches(
    dataset: MicroBatches, *, workers: int, pin_memory: bool, prefetch: int = 4
) -> Iterator[dict[str, Any]]:
    """The micro-batches in order, `prefetch` per worker read ahead (pinned for a CUDA copy)."""
    if workers == 0:
        return iter(dataset[i] for i in range(len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # an item already is a micro-batch
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch,
    )
    return iter(loader)
