"""Build a latent cache with every process: each encodes its own shards, one writes meta.json.

    cache = build_latent_cache(dataset, vae=vae, conditioning=TextConditioning(tokenizer),
                               preprocess=PreprocessSpec(512), cache_root=root,
                               layout=ProcessLayout.of(rank, world))

The folder is named by a key over everything that can change its numbers (format, dataset, VAE
weights and config, tokenizer, preprocessing, storage dtype, shard span), so stages and runs with
the same inputs share it and any change gets a new one.

How W processes cooperate, with no collective call (a process-group barrier would time out after
accelerate's default 10 minutes, long before 212k images are encoded):

1. process r encodes the shards k ≡ r (mod W) that are not on disk yet (a killed build keeps
   every finished shard), decoding and resizing images in DataLoader workers;
2. it writes `done-r-of-W.json`;
3. process 0 waits for all W markers, checks that the shards cover every row, and writes
   meta.json; the others wait for meta.json. Waits poll the folder, up to `wait_timeout` seconds
   (the recipe's `data.cache_timeout_hours`, hours by default), then fail with one line.

The cache folder must be one folder that all processes see. On several nodes that means a shared
file system: `check_shared_folder` proves it before any work (each node's first process writes a
file that process 0 must see), and `per_node=True` builds one cache per node instead.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from core.errors import UserInputError
from core.identity import model_identity, stable_hash
from distill.data.cache import LatentCache
from distill.data.encode import (
    PreparedRow,
    PreparedRows,
    ShardBuffer,
    encode_latent_distribution,
    keep_rows,
    prepare_row,
)
from distill.data.preprocess import PreprocessSpec
from distill.data.shards import (
    CAPTION_PREFIX,
    EMPTY_CAPTION_FILE,
    FORMAT_VERSION,
    META_FILE,
    SAMPLE_PREFIX,
    SKIP_REASONS,
    STORAGE_DTYPES,
    ShardInfo,
    done_marker,
    read_json,
    read_meta,
    read_shard_info,
    shard_name,
    write_json_atomic,
    write_safetensors_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_ROWS_PER_SHARD = 1024
DEFAULT_WAIT_SECONDS = 24 * 3600.0
_POLL_SECONDS = 1.0
_WARN_FIRST_UNREADABLE = 5


class CacheWaitTimeout(UserInputError):
    """The other processes did not finish their part of the cache in time."""


@dataclass(frozen=True)
class ProcessLayout:
    """Who builds which part: this process's rank among `world` builders, and the nodes."""

    rank: int = 0
    world: int = 1
    node_rank: int = 0
    num_nodes: int = 1

    @classmethod
    def of(cls, process_index: int, num_processes: int, *, per_node: bool = False) -> ProcessLayout:
        """From the global rank and world size; torchrun numbers ranks node by node and sets
        LOCAL_WORLD_SIZE. `per_node`: each node's processes build a cache of their own."""
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
        node_rank, num_nodes = process_index // local_world, max(1, num_processes // local_world)
        if per_node:
            return cls(process_index % local_world, local_world, 0, 1)
        return cls(process_index, num_processes, node_rank, num_nodes)


def cache_key_inputs(
    *,
    dataset_fingerprint: str,
    vae: torch.nn.Module,
    conditioning: Any,
    preprocess: PreprocessSpec,
    storage_dtype: str,
    rows_per_shard: int,
) -> dict[str, Any]:
    """Everything a cached number depends on; its hash names the cache folder. The text
    encoder is not in it: the cache holds token ids, which only the tokenizer decides."""
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset_fingerprint,
        "vae": model_identity(vae),
        "conditioning": conditioning.identity(),
        "preprocess": {**asdict(preprocess), "fingerprint": preprocess.fingerprint()},
        "storage_dtype": storage_dtype,
        "rows_per_shard": rows_per_shard,
    }


def build_latent_cache(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    vae: torch.nn.Module,
    conditioning: Any,
    preprocess: PreprocessSpec,
    cache_root: str | Path,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    storage_dtype: str = "float16",
    progress: bool = True,
    dataset_fingerprint: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    layout: ProcessLayout = ProcessLayout(),
    num_workers: int = 0,
    wait_timeout: float = DEFAULT_WAIT_SECONDS,
    seed: int = 0,
    check_key: Callable[[str], None] | None = None,
) -> LatentCache:
    """Encode `dataset` (rows `image`, `text`; see `load_image_text_dataset`) into
    `cache_root/latents-<key>/`, or reuse or complete the cache there, and open it.

    conditioning: gives each caption's fields to store (`caption_fields`) and its `identity()`
        for the key (`core.families.TextConditioning`).
    dataset_fingerprint: required for a streamed dataset (`sources.streaming_fingerprint`).
    device: where the VAE encodes (it is moved there). storage_dtype: "float16" (about half the
        size; see README) or "float32".
    batch_size: images per VAE call (× 2 with random_flip); rows_per_shard: source rows a shard
        covers. num_workers: DataLoader workers decoding images (map-style datasets).
    layout: this process's part (`ProcessLayout.of`); every process of the layout must call this.
    wait_timeout: seconds to wait for the other processes' parts.
    check_key: called with the key before anything is encoded (a resumed run may refuse it).

    Unusable rows are skipped and counted by reason (`LatentCache.skipped`); every process counts
    its own shards' and meta.json holds the sums.
    """
    if batch_size < 1 or rows_per_shard < 1:
        raise ValueError(
            f"batch_size and rows_per_shard must be positive: {batch_size}, {rows_per_shard}"
        )
    if storage_dtype not in STORAGE_DTYPES:
        raise UserInputError(
            f"unknown cache dtype {storage_dtype!r}; choose {', '.join(STORAGE_DTYPES)}"
        )
    _check_columns(dataset)
    if device is not None:
        vae.to(device)
    key_inputs = cache_key_inputs(
        dataset_fingerprint=fingerprint_of_dataset(dataset, dataset_fingerprint),
        vae=vae,
        conditioning=conditioning,
        preprocess=preprocess,
        storage_dtype=storage_dtype,
        rows_per_shard=rows_per_shard,
    )
    key = stable_hash(key_inputs)
    if check_key is not None:
        check_key(key)
    folder = Path(cache_root) / f"latents-{key}"
    built = read_meta(folder) is None
    rank, world = layout.rank, layout.world
    started = time.monotonic()
    if built:
        folder.mkdir(parents=True, exist_ok=True)
        check_shared_folder(
            folder, node_rank=layout.node_rank, num_nodes=layout.num_nodes, timeout=600.0
        )
        builder = _ShardEncoder(
            folder, vae, conditioning, preprocess, STORAGE_DTYPES[storage_dtype], batch_size
        )
        rows = _encode_my_shards(
            builder, dataset, rows_per_shard, rank, world, num_workers, progress and rank == 0
        )
        write_json_atomic(folder / done_marker(rank, world), {"rows": rows})
        if rank == 0:
            _wait_for(
                lambda: all((folder / done_marker(r, world)).is_file() for r in range(world)),
                wait_timeout,
                f"the other {world - 1} processes to encode their shards of {folder}",
            )
            _write_meta(folder, key, key_inputs, builder, rows_per_shard, world)
        else:
            _wait_for(lambda: read_meta(folder) is not None, wait_timeout, f"{folder}/{META_FILE}")
    cache = LatentCache(folder, seed=seed)
    if built and rank == 0:
        _report(cache, time.monotonic() - started, world)
    return cache


# ----------------------------------------------------------------------------- encoding


class _ShardEncoder:
    """Rows in, shard files out: the usable rows of a shard in fixed batches through the VAE
    (fixed by position, so the same rows always meet in the same batch), then one atomic write."""

    def __init__(
        self,
        folder: Path,
        vae: torch.nn.Module,
        conditioning: Any,
        preprocess: PreprocessSpec,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.folder, self.vae, self.conditioning = folder, vae, conditioning
        self.preprocess, self.dtype, self.batch_size = preprocess, dtype, batch_size
        self.unreadable_seen = 0

    def write_shard(self, index: int, start: int, end: int, rows: Iterator[PreparedRow]) -> None:
        buffer, pending = ShardBuffer(), []
        for row in rows:
            if row.problem is not None:
                buffer.skipped[row.problem] += 1
                self._warn(row)
                continue
            pending.append(row)
            if len(pending) == self.batch_size:
                self._encode(pending, buffer)
                pending = []
        if pending:
            self._encode(pending, buffer)
        fields = self.conditioning.caption_fields(list(buffer.captions)) if buffer.captions else {}
        info = ShardInfo(index, len(buffer), start, end, dict(buffer.skipped))
        write_safetensors_atomic(
            self.folder / info.file, buffer.tensors(fields, self.dtype), metadata=info.to_metadata()
        )

    def _encode(self, rows: list[PreparedRow], buffer: ShardBuffer) -> None:
        pixels = torch.cat([row.pixels for row in rows])  # (B·V, 3, R, R)
        parameter = next(self.vae.parameters())
        with _eval_mode(self.vae):
            mean, logvar = encode_latent_distribution(
                self.vae, pixels.to(parameter.device, parameter.dtype)
            )
        per_sample = (len(rows), rows[0].pixels.shape[0], *mean.shape[1:])  # (B, V, C, h, w)
        fields = [
            self.conditioning.sample_fields(
                row.original_size, row.crop_top_left, self.preprocess.resolution
            )
            for row in rows
        ]
        buffer.add(rows, mean.reshape(per_sample).cpu(), logvar.reshape(per_sample).cpu(), fields)

    def _warn(self, row: PreparedRow) -> None:
        if row.problem == "unreadable_image":
            self.unreadable_seen += 1
            if self.unreadable_seen <= _WARN_FIRST_UNREADABLE:
                logger.warning(
                    "skipping unreadable image in row %d: %s", row.source_index, row.error
                )


def _encode_my_shards(
    builder: _ShardEncoder,
    dataset: datasets.Dataset | datasets.IterableDataset,
    rows_per_shard: int,
    rank: int,
    world: int,
    workers: int,
    progress: bool,
) -> int:
    """Encode this process's missing shards; return the number of source rows."""
    rows = undecoded(dataset)
    if isinstance(rows, datasets.Dataset):
        total = len(rows)
        mine = [k for k in range(math.ceil(total / rows_per_shard)) if k % world == rank]
        todo = [k for k in mine if not _shard_done(builder.folder, k)]
        bar = _bar(progress, sum(min(rows_per_shard, total - k * rows_per_shard) for k in todo))
        for k in todo:
            start, end = k * rows_per_shard, min((k + 1) * rows_per_shard, total)
            prepared = _prepared(rows, start, end, builder.preprocess, workers)
            builder.write_shard(k, start, end, _counted(prepared, bar))
        bar.close()
        return total
    return _encode_streamed(builder, rows, rows_per_shard, rank, world, progress)


def _encode_streamed(
    builder: _ShardEncoder, rows: Any, rows_per_shard: int, rank: int, world: int, progress: bool
) -> int:
    """A streamed dataset has no random access: every process reads the stream, and prepares
    (decodes) only the rows of its own shards."""
    bar, total, shard, current = _bar(progress, None), 0, None, []
    for index, row in enumerate(rows):
        total = index + 1
        k = index // rows_per_shard
        if k % world != rank or _shard_done(builder.folder, k):
            continue
        if shard is not None and k != shard:
            builder.write_shard(
                shard, shard * rows_per_shard, (shard + 1) * rows_per_shard, iter(current)
            )
            current = []
        shard = k
        current.append(prepare_row(index, row, builder.preprocess))
        bar.update()
    if shard is not None:
        end = min((shard + 1) * rows_per_shard, total)
        builder.write_shard(shard, shard * rows_per_shard, end, iter(current))
    bar.close()
    return total


def _prepared(rows: datasets.Dataset, start: int, end: int, spec: PreprocessSpec, workers: int):
    if workers == 0:
        return (prepare_row(i, rows[i], spec) for i in range(start, end))
    loader = torch.utils.data.DataLoader(
        PreparedRows(rows, start, end, spec),
        batch_size=32,
        num_workers=workers,
        collate_fn=keep_rows,
        prefetch_factor=4,
    )
    return (row for batch in loader for row in batch)  # DataLoader keeps the order


def _counted(rows: Iterator[PreparedRow], bar: tqdm) -> Iterator[PreparedRow]:
    for row in rows:
        yield row
        bar.update()


def _bar(progress: bool, total: int | None) -> tqdm:
    return tqdm(total=total, disable=not progress, desc="caching latents", unit="img")


def _shard_done(folder: Path, index: int) -> bool:
    return read_shard_info(folder / shard_name(index)) is not None


# ----------------------------------------------------------------------------- completion


def _write_meta(
    folder: Path,
    key: str,
    key_inputs: dict[str, Any],
    builder: _ShardEncoder,
    rows_per_shard: int,
    world: int,
) -> None:
    """Check that the shards cover rows [0, N) and write meta.json (the last file)."""
    rows = {read_json(folder / done_marker(r, world))["rows"] for r in range(world)}
    if len(rows) != 1:
        raise RuntimeError(f"the processes saw different numbers of rows: {sorted(rows)}")
    total = rows.pop()
    shards = []
    for k in range(math.ceil(total / rows_per_shard)):
        info = read_shard_info(folder / shard_name(k))
        if info is None or info.source_start != k * rows_per_shard:
            raise RuntimeError(f"{folder}: shard {k} is missing or damaged after the build")
        shards.append(info)
    skipped = {reason: sum(s.skipped.get(reason, 0) for s in shards) for reason in SKIP_REASONS}
    count = sum(s.count for s in shards)
    if count == 0:
        counts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in skipped.items() if n)
        raise UserInputError(f"no usable samples to cache (skipped: {counts or 'no rows at all'})")
    empty = {
        f"{CAPTION_PREFIX}{name}": value[0]
        for name, value in builder.conditioning.caption_fields([""]).items()
    }
    write_safetensors_atomic(folder / EMPTY_CAPTION_FILE, empty)
    first = next(s for s in shards if s.count)
    with safe_open(str(folder / first.file), framework="pt") as handle:
        _, num_variants, *latent_shape = handle.get_slice("latent_mean").get_shape()
        names = list(handle.keys())
    fields = [
        name.removeprefix(CAPTION_PREFIX) for name in names if name.startswith(CAPTION_PREFIX)
    ]
    per_image = [
        name.removeprefix(SAMPLE_PREFIX) for name in names if name.startswith(SAMPLE_PREFIX)
    ]
    config = builder.vae.config
    write_json_atomic(
        folder / META_FILE,
        {
            "format": FORMAT_VERSION,
            "key": key,
            "count": count,
            "source_rows": total,
            "skipped": skipped,
            "num_variants": num_variants,
            "variants": ["original", "flipped"][:num_variants],
            "latent_shape": latent_shape,
            "caption_fields": sorted(fields),
            "sample_fields": sorted(per_image),
            "storage_dtype": str(builder.dtype).removeprefix("torch."),
            "scaling_factor": getattr(config, "scaling_factor", None),
            "shift_factor": getattr(config, "shift_factor", None),
            "bytes": sum((folder / s.file).stat().st_size for s in shards),
            "shards": [asdict(s) for s in shards],
            "key_inputs": key_inputs,
        },
    )


def _report(cache: LatentCache, seconds: float, world: int) -> None:
    """One line when a build ends: pairs, skips by reason, bytes per pair, images per second."""
    meta = cache.meta
    skipped = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in meta["skipped"].items() if n)
    print(
        f"latent cache {cache.folder.name}: {meta['count']} pairs from {meta['source_rows']} "
        f"rows (skipped: {skipped or 'none'}), {cache.bytes_per_pair / 1024:.1f} KB per pair "
        f"({meta['storage_dtype']}), {meta['source_rows'] / max(seconds, 1e-9):.1f} images/s "
        f"with {world} process{'es' if world > 1 else ''}",
        flush=True,
    )


def _wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise CacheWaitTimeout(
                f"waited {timeout / 3600:.3g} h for {what}; raise data.cache_timeout_hours, or "
                "check that every process can write the cache folder"
            )
        time.sleep(_POLL_SECONDS)


def check_shared_folder(folder: Path, *, node_rank: int, num_nodes: int, timeout: float) -> None:
    """On several nodes, prove that `folder` is one shared folder: each node's first process
    writes `nodes/<node>.json`, and every node waits until it sees all of them."""
    if num_nodes <= 1:
        return
    nodes = folder / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        nodes / f"{node_rank}.json", {"host": socket.gethostname(), "pid": os.getpid()}
    )
    try:
        _wait_for(
            lambda: all((nodes / f"{n}.json").is_file() for n in range(num_nodes)),
            timeout,
            f"the other nodes' marker files in {nodes}",
        )
    except CacheWaitTimeout:
        raise UserInputError(
            f"the cache folder {str(folder)!r} is not shared between the {num_nodes} nodes (node "
            f"{node_rank} cannot see the others' files): put data.cache_dir on a shared file "
            "system, or set data.cache_per_node: true to build one cache per node"
        ) from None


# ----------------------------------------------------------------------------- helpers


def _check_columns(dataset: datasets.Dataset | datasets.IterableDataset) -> None:
    columns = dataset.column_names
    if columns is not None and not {"image", "text"} <= set(columns):
        raise UserInputError(
            "the dataset to cache needs columns 'image' and 'text' "
            f"(load it with load_image_text_dataset); it has: {', '.join(columns)}"
        )


def fingerprint_of_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset, given: str | None
) -> str:
    if given is not None:
        return given
    if isinstance(dataset, datasets.Dataset):
        return dataset._fingerprint  # content/recipe hash `datasets` maintains through transforms
    raise ValueError(
        "a streamed dataset has no fingerprint: pass "
        "dataset_fingerprint=streaming_fingerprint(source, ...) to build_latent_cache"
    )


def undecoded(
    dataset: datasets.Dataset | datasets.IterableDataset,
) -> datasets.Dataset | datasets.IterableDataset:
    """Hand out image bytes/paths instead of PIL images, so one corrupt file is a skipped row in
    our loop rather than an exception inside `datasets`' iterator."""
    feature = dataset.features.get("image") if dataset.features is not None else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


class _eval_mode:
    """Encode without dropout, and hand the module back in the mode it came in."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.mode = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.mode)
