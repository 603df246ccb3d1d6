"""Encode a dataset once with the teacher's VAE and text encoder; train from the cache after.

Training steps then run neither encoder: a step reads the VAE posterior (mean, std) and the
caption's embedding, draws z = (mean + std·ε)·scaling_factor (`sample_latents`), and goes on.
Storing the distribution, not one sample, keeps that draw exact: every epoch sees fresh posterior
noise, as when encoding on the fly.

A cache folder is named by a key over everything that can change its numbers (dataset, VAE and text
encoder weights and configs, tokenizer, preprocessing, dtype), so stages and runs with the same
inputs share it and any change gets a new one. See `shards.py` for the format and why a crash never
leaves a cache that looks complete.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from distill.data.encode import (
    PendingSample,
    ShardBuffer,
    decode_image,
    encode_captions,
    encode_latent_distribution,
    image_variants,
    row_problem,
)
from distill.data.fingerprint import model_identity, stable_hash, tokenizer_identity
from distill.data.metadata import as_text
from distill.data.preprocess import PreprocessSpec
from distill.data.shards import (
    EMPTY_TEXT_FILE,
    FORMAT_VERSION,
    META_FILE,
    SKIP_REASONS,
    ShardInfo,
    contiguous_shards,
    read_meta,
    remove_temporary_files,
    shard_name,
    write_json_atomic,
    write_safetensors_atomic,
)
from distill.errors import UserInputError

logger = logging.getLogger(__name__)

# Caches up to this size are read into memory (the offline world: ~60k × 2 × 4×8×8 floats); bigger
# ones (LAION: ~250 KB per sample at 512 px) are read per item through safetensors' mmap.
PRELOAD_LIMIT_BYTES = 2 * 1024**3
_WARN_FIRST_UNREADABLE = 5
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


# ----------------------------------------------------------------------------- building


def cache_key_inputs(
    *,
    dataset_fingerprint: str,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    preprocess: PreprocessSpec,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Everything a cached number depends on; its hash names the cache folder."""
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset_fingerprint,
        "vae": model_identity(vae),
        "text_encoder": model_identity(text_encoder),
        "tokenizer": tokenizer_identity(tokenizer),
        "preprocess": {**asdict(preprocess), "fingerprint": preprocess.fingerprint()},
        "dtype": str(dtype),
    }


def build_latent_cache(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    preprocess: PreprocessSpec,
    cache_root: str | Path,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    dataset_fingerprint: str | None = None,
    shard_size: int = 1024,
    accelerator: Any = None,
    seed: int = 0,
    preload: bool | None = None,
    check_key: Callable[[str], None] | None = None,
) -> LatentCache:
    """Encode `dataset` (rows `image`, `text`; see `load_image_text_dataset`) into
    `cache_root/latents-<key>/`, or reuse/resume the cache already there, and open it.

    dataset_fingerprint: required for a streamed dataset (use `sources.streaming_fingerprint`);
        a map-style dataset's own `_fingerprint` is used otherwise.
    device: where to encode; the VAE and text encoder are moved there (in place, as diffusers'
        training scripts do). None: where the VAE already is.
    dtype: the models' dtype, which is also the stored dtype. A mismatch raises instead of casting
        the teacher behind the caller's back.
    batch_size: samples per encoder call (the VAE sees batch_size × 2 images with random_flip).
    shard_size: samples per shard file (flushed at batch boundaries, so shards may be larger).
    accelerator: an `accelerate.Accelerator`; only its main process encodes, the others wait and
        then read the finished cache.
    seed, preload: passed to `LatentCache`.
    check_key: called with the cache key before anything is encoded (it may raise: a resumed run
        refuses a cache other than the one it started on).

    Rows that cannot be used (an unreadable row or image, a missing or empty caption) are skipped
    and counted by reason (`.skipped`); captions of other types are used as text.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive: {batch_size}, {shard_size}")
    _check_columns(dataset)
    fingerprint = _dataset_fingerprint(dataset, dataset_fingerprint)
    _place_models(vae, text_encoder, device=device, dtype=dtype)
    key_inputs = cache_key_inputs(
        dataset_fingerprint=fingerprint,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        preprocess=preprocess,
        dtype=dtype,
    )
    key = stable_hash(key_inputs)
    if check_key is not None:
        check_key(key)
    folder = Path(cache_root) / f"latents-{key}"
    main_first = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with main_first:
        if (accelerator is None or accelerator.is_main_process) and not _is_complete(folder, key):
            folder.mkdir(parents=True, exist_ok=True)
            with _build_lock(folder):
                if not _is_complete(folder, key):  # another builder may have finished meanwhile
                    _encode_dataset(
                        dataset,
                        folder=folder,
                        key=key,
                        key_inputs=key_inputs,
                        vae=vae,
                        text_encoder=text_encoder,
                        tokenizer=tokenizer,
                        preprocess=preprocess,
                        dtype=dtype,
                        batch_size=batch_size,
                        shard_size=shard_size,
                        progress=progress,
                    )
        return LatentCache(folder, seed=seed, preload=preload)


def _is_complete(folder: Path, key: str) -> bool:
    meta = read_meta(folder)
    return meta is not None and meta.get("key") == key


def _check_columns(dataset: datasets.Dataset | datasets.IterableDataset) -> None:
    columns = dataset.column_names
    if columns is not None and not {"image", "text"} <= set(columns):
        raise UserInputError(
            "the dataset to cache needs columns 'image' and 'text' "
            f"(load it with load_image_text_dataset); it has: {', '.join(columns)}"
        )


def _dataset_fingerprint(
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


def _place_models(
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> None:
    for name, model in (("vae", vae), ("text_encoder", text_encoder)):
        if device is not None:
            model.to(device)
        model_dtype = next(model.parameters()).dtype
        if model_dtype != dtype:
            raise ValueError(
                f"{name} weights are {model_dtype} but dtype={dtype}: pass dtype={model_dtype} "
                f"or cast the model first"
            )


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder per cache folder, across processes and concurrent runs sharing `cache_root`
    (POSIX advisory lock): a second builder waits, then finds the cache complete."""
    with open(folder / ".lock", "a") as handle:  # "a": never truncates, never touches mtime
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Encode without dropout, and hand the modules back in the mode they came in."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def _undecoded(
    dataset: datasets.Dataset | datasets.IterableDataset,
) -> datasets.Dataset | datasets.IterableDataset:
    """Hand out image bytes/paths instead of PIL images, so one corrupt file is a skipped row in
    our loop rather than an exception inside `datasets`' iterator."""
    feature = dataset.features.get("image") if dataset.features is not None else None
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def _encode_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    folder: Path,
    key: str,
    key_inputs: dict[str, Any],
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    preprocess: PreprocessSpec,
    dtype: torch.dtype,
    batch_size: int,
    shard_size: int,
    progress: bool,
) -> None:
    """Encode the rows not covered by finished shards, then write meta.json (last)."""
    (folder / META_FILE).unlink(missing_ok=True)  # stale or damaged: it must not outlive this build
    remove_temporary_files(folder)
    done = contiguous_shards(folder)
    start = done[-1].source_end if done else 0
    if start:
        logger.info("resuming latent cache %s after %d source rows", folder, start)
    rows = _undecoded(dataset)
    total = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    if total is not None and start >= total:
        rows = []  # every row is in a shard (killed before meta.json): only meta.json is left
    elif start:
        rows = rows.skip(start)  # datasets 5.2: skip(len) of a map-style dataset raises
    encoder = _ShardedEncoder(
        folder,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        preprocess=preprocess,
        dtype=dtype,
        batch_size=batch_size,
        shard_size=shard_size,
        source_start=start,
    )
    with _eval_mode(vae, text_encoder):
        empty = encode_captions(text_encoder, tokenizer, [""])[0].cpu()  # (L, D)
        write_safetensors_atomic(folder / EMPTY_TEXT_FILE, {"text_embedding": empty})
        bar = tqdm(total=total, initial=start, disable=not progress, desc="caching latents")
        for source_index, row in enumerate(rows, start=start):
            encoder.add_row(source_index, row)
            bar.update()
        bar.close()
        new_shards, tail_skipped = encoder.finish()
    shards = done + new_shards
    skipped = {
        reason: tail_skipped[reason] + sum(s.skipped.get(reason, 0) for s in shards)
        for reason in SKIP_REASONS
    }
    count = sum(s.count for s in shards)
    if count == 0:
        counts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in skipped.items() if n)
        raise UserInputError(f"no usable samples to cache (skipped: {counts or 'no rows at all'})")
    with safe_open(str(folder / shards[0].file), framework="pt") as first:
        _, num_variants, *latent_shape = first.get_slice("latent_mean").get_shape()
    if any(skipped.values()):
        logger.warning("latent cache skipped rows: %s", skipped)
    write_json_atomic(
        folder / META_FILE,
        {
            "format": FORMAT_VERSION,
            "key": key,
            "count": count,
            "source_rows": encoder.source_end,
            "skipped": skipped,
            "num_variants": num_variants,
            "variants": ["original", "flipped"][:num_variants],
            "latent_shape": latent_shape,
            "text_embedding_shape": list(empty.shape),
            "dtype": str(dtype),
            "scaling_factor": getattr(vae.config, "scaling_factor", None),
            "shift_factor": getattr(vae.config, "shift_factor", None),
            "shards": [asdict(s) for s in shards],
            "key_inputs": key_inputs,
        },
    )


class _ShardedEncoder:
    """Rows in, shard files out: checks each row, batches the good ones through the encoders,
    writes a shard whenever `shard_size` samples are buffered at a batch boundary.

    A shard is flushed only right after a batch is encoded, when no accepted row is still waiting,
    so the shard's source range [start, end) and skip counts account for every row in it.
    """

    def __init__(
        self,
        folder: Path,
        *,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        preprocess: PreprocessSpec,
        dtype: torch.dtype,
        batch_size: int,
        shard_size: int,
        source_start: int,
    ) -> None:
        self.folder = folder
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.preprocess, self.dtype = preprocess, dtype
        self.batch_size, self.shard_size = batch_size, shard_size
        self.source_end = source_start  # one past the last row seen
        self.buffer = ShardBuffer(source_start=source_start)
        self.pending: list[PendingSample] = []
        self.written: list[ShardInfo] = []
        self.unreadable_seen = 0

    def add_row(self, source_index: int, row: dict[str, Any]) -> None:
        self.source_end = source_index + 1
        caption = as_text(row.get("text"))  # a number or a list is text too; None stays None
        problem = row_problem(row.get("image"), caption)
        if problem is not None:
            self.buffer.skipped[problem] += 1
            return
        try:
            pixels = image_variants(decode_image(row.get("image")), self.preprocess, source_index)
        # PIL signals a bad file with OSError, SyntaxError, ValueError, struct.error or
        # DecompressionBombError depending on the format: any of them means "skip this row".
        except Exception as error:
            self.buffer.skipped["unreadable_image"] += 1
            self.unreadable_seen += 1
            if self.unreadable_seen <= _WARN_FIRST_UNREADABLE:
                logger.warning("skipping unreadable image in row %d: %r", source_index, error)
            return
        self.pending.append(PendingSample(source_index, pixels, caption))
        if len(self.pending) == self.batch_size:
            self._encode_pending()
            if len(self.buffer) >= self.shard_size:
                self._write_shard()

    def finish(self) -> tuple[list[ShardInfo], dict[str, int]]:
        """Encode and write what is left; return (new shards, skips after the last shard)."""
        if self.pending:
            self._encode_pending()
        if len(self.buffer):
            self._write_shard()
        return self.written, dict(self.buffer.skipped)

    def _encode_pending(self) -> None:
        batch, self.pending = self.pending, []
        pixels = torch.cat([sample.pixels for sample in batch])  # (B·V, 3, R, R)
        vae_device = next(self.vae.parameters()).device
        mean, std = encode_latent_distribution(self.vae, pixels.to(vae_device, self.dtype))
        per_sample = (len(batch), batch[0].pixels.shape[0], *mean.shape[1:])  # (B, V, C, h, w)
        captions = self.buffer.unseen_captions([sample.caption for sample in batch])
        if captions:
            embeddings = encode_captions(self.text_encoder, self.tokenizer, captions)
            self.buffer.add_captions(captions, embeddings.cpu())
        mean, std = mean.reshape(per_sample).cpu(), std.reshape(per_sample).cpu()
        self.buffer.add_samples(batch, mean, std)

    def _write_shard(self) -> None:
        info = ShardInfo(
            file=shard_name(self.buffer.source_start),
            count=len(self.buffer),
            source_start=self.buffer.source_start,
            source_end=self.source_end,
            skipped=dict(self.buffer.skipped),
        )
        write_safetensors_atomic(
            self.folder / info.file, self.buffer.tensors(), metadata=info.to_metadata()
        )
        self.written.append(info)
        self.buffer = ShardBuffer(source_start=self.source_end)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CachedBatch:
    """A training batch as the cache stores it, before noising (`distill.step.noise_batch`)."""

    latent_mean: torch.Tensor  # (B, C, h, w) VAE posterior mean, unscaled
    latent_std: torch.Tensor  # (B, C, h, w)
    conditioning: dict[str, torch.Tensor]  # UNet inputs, e.g. encoder_hidden_states (B, L, D)


class LatentCache(torch.utils.data.Dataset):
    """A finished cache as a map-style dataset.

    `cache[i]` → {"latent_mean": (C, h, w), "latent_std": (C, h, w), "text_embedding": (L, D),
    "index": i, "source_index": row in the source dataset, "flipped": bool}. With two variants
    stored, which one `cache[i]` returns is `flip_choice(seed, epoch, i)`: call `set_epoch` each
    epoch (as with `DistributedSampler`; with `persistent_workers=True` the workers keep the epoch
    they were started with). `item(i, variant)` picks a variant explicitly.
    """

    def __init__(self, folder: str | Path, *, seed: int = 0, preload: bool | None = None) -> None:
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
        self._shard_files = [self.folder / shard["file"] for shard in meta["shards"]]
        counts = [shard["count"] for shard in meta["shards"]]
        self._shard_starts = [sum(counts[:k]) for k in range(len(counts))]
        if sum(counts) != meta["count"]:
            raise UserInputError(f"latent cache {str(self.folder)!r} is damaged; delete it")
        if preload is None:
            preload = sum(path.stat().st_size for path in self._shard_files) <= PRELOAD_LIMIT_BYTES
        self._loaded = [load_file(str(path)) for path in self._shard_files] if preload else None
        self._handles: dict[int, Any] = {}
        self._handles_pid = os.getpid()
        self._empty_text = load_file(str(self.folder / EMPTY_TEXT_FILE))["text_embedding"]

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
    def empty_text_embedding(self) -> torch.Tensor:
        """(L, D) embedding of the empty prompt, the target of classifier-free-guidance dropout."""
        return self._empty_text

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
        """The (index, epoch) samples, stacked, with their conditioning as the UNet's inputs."""
        items = [self.shown(index, epoch) for index, epoch in samples]
        return CachedBatch(
            latent_mean=torch.stack([item["latent_mean"] for item in items]),
            latent_std=torch.stack([item["latent_std"] for item in items]),
            conditioning={
                "encoder_hidden_states": torch.stack([item["text_embedding"] for item in items])
            },
        )

    @property
    def empty_conditioning(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning (no batch axis): classifier-free dropout's input."""
        return {"encoder_hidden_states": self._empty_text}

    def item(self, index: int, variant: int = 0) -> dict[str, torch.Tensor]:
        """Sample `index` in variant `variant` (0 original, 1 flipped when stored)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)}")
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} not stored (cache has {self.num_variants})")
        shard = bisect.bisect_right(self._shard_starts, index) - 1
        row = index - self._shard_starts[shard]
        slot = int(self._read(shard, "text_slot", row))
        # clone(): a view would pin (and, across DataLoader workers, share) the whole shard.
        return {
            "latent_mean": self._read(shard, "latent_mean", row)[variant].clone(),
            "latent_std": self._read(shard, "latent_std", row)[variant].clone(),
            "text_embedding": self._read(shard, "text_embedding", slot).clone(),
            "index": torch.tensor(index),
            "source_index": self._read(shard, "source_index", row).clone(),
            "flipped": torch.tensor(variant == 1),
        }

    def _read(self, shard: int, name: str, row: int) -> torch.Tensor:
        if self._loaded is not None:
            return self._loaded[shard][name][row]
        return self._handle(shard).get_slice(name)[row]

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
