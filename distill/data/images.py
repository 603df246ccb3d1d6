"""The data's images as stage rows: preprocessed pixels, for kinds that train on images (the
offline world's VAE), where the latent kinds read the latent cache.

A micro-batch decodes and preprocesses its rows on the spot (in the loader's workers): the same
`prepare_row` as the cache builder, so a row the cache would skip (unreadable image, empty
caption) is never trained on here either. Which flip a sample shows is `flip_choice(seed, epoch,
index)`, as in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import datasets
import torch

from core.errors import UserInputError
from core.identity import stable_hash
from distill.data.build import fingerprint_of_dataset, undecoded
from distill.data.cache import flip_choice
from distill.data.encode import prepare_row
from distill.data.preprocess import PreprocessSpec


class ImageRows:
    """`len` usable rows of a map-style dataset; `micro_batch` gives their pixels (B, 3, R, R)."""

    def __init__(self, dataset: datasets.Dataset, spec: PreprocessSpec, *, seed: int = 0) -> None:
        if not isinstance(dataset, datasets.Dataset):
            raise UserInputError("training on images needs a map-style dataset, not a stream")
        self.rows, self.spec, self.seed = undecoded(dataset), spec, seed
        self.key = stable_hash(
            {"dataset": fingerprint_of_dataset(dataset, None), "preprocess": asdict(spec)}
        )
        if len(self.rows) == 0:
            raise UserInputError("the dataset has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def micro_batch(self, samples: Sequence[tuple[int, int]]) -> dict[str, Any]:
        pixels = []
        for index, epoch in samples:
            row = prepare_row(index, self.rows[index], self.spec)
            if row.problem is not None:
                raise UserInputError(f"row {index} cannot be trained on: {row.problem}")
            variant = int(row.pixels.shape[0] == 2 and flip_choice(self.seed, epoch, index))
            pixels.append(row.pixels[variant])
        return {"pixels": torch.stack(pixels)}  # (B, 3, R, R) in [-1, 1]
