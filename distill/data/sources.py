"""Where training images and captions come from, all through 🤗 `datasets`.

One entry point, `load_image_text_dataset`, turns a source string into rows of `image` (PIL) and
`text` (str):

    "fashion-mnist"                 a registered source (core.plugins): the offline world's
                                    Fashion-MNIST with class captions
    path/to/shard-{00000..00099}.tar  webdataset shards (LAION via img2dataset), glob or braces
    path/to/saved                   a folder written by `Dataset.save_to_disk`
    path/to/images                  an imagefolder with metadata.jsonl / metadata.csv captions
                                    (read row by row: `distill.data.metadata`)
    owner/name                      a hub dataset (needs a network)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

import datasets

from core import plugins
from core.errors import UserInputError
from distill.data.metadata import SIGNATURE_COLUMN, caption_folder_dataset, metadata_files

# Webdataset shards name their fields by file extension: `0001.jpg` + `0001.txt` is one sample.
# These stand in for the default column names when the dataset has no `image` / `text` column.
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_TEXT_KEYS = ("txt",)

_ENCODED_IMAGE_DTYPES = ("binary", "large_binary", "string")  # image bytes or file paths
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACES = re.compile(r"\{(?:(\d+)\.\.(\d+)|([^{}]*,[^{}]*))\}")  # {000..099} or {a,b}


def load_image_text_dataset(
    source: str,
    *,
    image_column: str = "image",
    text_column: str = "text",
    split: str = "train",
    streaming: bool = False,
    max_samples: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load `source` as rows `{"image": PIL.Image, "text": str}` (other columns are dropped).

    `image_column` / `text_column` name the source's columns; webdataset keys (`jpg`/`png`/`webp`,
    `txt`) are used when the default names are absent. `max_samples` keeps the first rows.
    Webdataset shards always stream; `streaming=True` streams the others too. `cache_dir` is where
    `datasets` keeps its Arrow files (default: its own cache).
    """
    if max_samples is not None and max_samples < 1:
        raise UserInputError(f"max_samples must be positive, got {max_samples}")
    dataset = _load_raw(
        source, split=split, streaming=streaming, max_samples=max_samples, cache_dir=cache_dir
    )
    if streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    dataset = _select_image_text(
        dataset, source, image_column=image_column, text_column=text_column
    )
    if max_samples is not None:
        if isinstance(dataset, datasets.Dataset):
            if len(dataset) > max_samples:
                dataset = dataset.select(range(max_samples))
        else:
            dataset = dataset.take(max_samples)
    return dataset


def streaming_fingerprint(source: str, **options: object) -> str:
    """A stable identity for a streamed dataset, which (unlike a map-style one) has no
    `_fingerprint`: the source string, the options that change its rows (split, columns,
    max_samples), and for local webdataset shards each file's name and size, so rewritten shards
    behind the same pattern get a new cache. Pass it to `build_latent_cache(dataset_fingerprint=)`.
    """
    payload: dict[str, object] = {"source": source, **options}
    if is_webdataset_source(source) and "://" not in source:
        files = sorted({f for p in expand_braces(source) for f in glob.glob(os.path.expanduser(p))})
        payload["shards"] = [(os.path.basename(f), os.path.getsize(f)) for f in files]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_webdataset_source(source: str) -> bool:
    """True for a `.tar` shard path, glob or brace pattern."""
    return source.endswith(_SHARD_SUFFIXES)


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: `a-{000..002}.tar` → a-000.tar, a-001.tar, a-002.tar and
    `{a,b}.tar` → a.tar, b.tar (zero padding follows the range's first bound). Globs are left for
    `datasets` to resolve."""
    match = _BRACES.search(pattern)  # leftmost group first, so the order is the shell's
    if match is None:
        return [pattern]
    first, last, listed = match.groups()
    if listed is not None:
        options = listed.split(",")
    else:
        width = len(first) if first.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _load_raw(
    source: str,
    *,
    split: str,
    streaming: bool,
    max_samples: int | None,
    cache_dir: str | Path | None,
) -> datasets.Dataset | datasets.IterableDataset:
    cache_dir = str(cache_dir) if cache_dir is not None else None
    registered = plugins.load(plugins.SOURCES, source)  # a named source, e.g. "fashion-mnist"
    if registered is not None:
        # Truncating first skips decoding the rows we would throw away.
        return registered(split=split, max_samples=max_samples)
    if is_webdataset_source(source):
        return _load_webdataset(source, split=split, cache_dir=cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, split=split)
        return _load_local_folder(path, split=split, streaming=streaming, cache_dir=cache_dir)
    if path.exists():
        raise UserInputError(f"dataset source {source!r} is a file, not a folder or .tar shards")
    if _looks_like_local_path(source):
        raise UserInputError(f"dataset folder {source!r} does not exist")
    return _load_hub(source, split=split, streaming=streaming, cache_dir=cache_dir)


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that names no existing file is a typo'd
    local path, which deserves "does not exist" rather than a hub error."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _load_webdataset(source: str, *, split: str, cache_dir: str | None) -> datasets.IterableDataset:
    patterns = expand_braces(source)
    is_remote = "://" in source
    if not is_remote and not any(glob.glob(str(Path(p).expanduser())) for p in patterns):
        raise UserInputError(f"no webdataset shards match {source!r}")
    files = patterns if is_remote else [str(Path(p).expanduser()) for p in patterns]
    try:
        return datasets.load_dataset(
            "webdataset",
            data_files={split: files},
            split=split,
            streaming=True,
            cache_dir=cache_dir,
        )
    except (ValueError, FileNotFoundError) as error:  # malformed shards, mismatched sample keys
        raise UserInputError(f"cannot read webdataset shards {source!r}: {error}") from error


def _load_saved(path: Path, *, split: str) -> datasets.Dataset:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserInputError(
                f"split {split!r} not in saved dataset {str(path)!r}; "
                f"available splits: {', '.join(saved)}"
            )
        saved = saved[split]
    return saved


def _load_local_folder(
    path: Path, *, split: str, streaming: bool, cache_dir: str | None
) -> datasets.Dataset | datasets.IterableDataset:
    """An imagefolder (captions from metadata.jsonl/csv, the LAION layout BK-SDM uses), or a folder
    of webdataset shards."""
    if not any(path.rglob("metadata.*")):
        shards = sorted(str(p) for s in _SHARD_SUFFIXES for p in path.glob(f"*{s}"))
        if shards:
            return datasets.load_dataset(
                "webdataset",
                data_files={split: shards},
                split=split,
                streaming=True,
                cache_dir=cache_dir,
            )
    split_folder = path / split
    captioned = split_folder if metadata_files(split_folder) else path
    if metadata_files(captioned):
        return caption_folder_dataset(captioned)  # row by row: one bad caption costs one row
    try:
        return datasets.load_dataset(
            "imagefolder", data_dir=str(path), split=split, streaming=streaming, cache_dir=cache_dir
        )
    except ValueError as error:  # e.g. unknown split
        raise UserInputError(f"cannot read image folder {str(path)!r}: {error}") from error


def _load_hub(
    name: str, *, split: str, streaming: bool, cache_dir: str | None
) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=cache_dir)
    # Offline, unknown name, gated, no such split: `datasets` raises a dozen types for what is, to
    # the user, one problem with one fix (check the name or the network).
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"dataset {name!r} could not be loaded from the Hugging Face Hub "
            f"({type(error).__name__}: {reason}); for local data pass an existing folder"
        ) from error


def _column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return [name for name in dataset.column_names if name != SIGNATURE_COLUMN]
    # A streamed dataset may not know its features until it reads a row.
    first_row = next(iter(dataset.take(1)), None)
    return list(first_row) if first_row is not None else []


def _resolve_column(
    wanted: str,
    default: str,
    fallbacks: tuple[str, ...],
    columns: list[str],
    source: str,
    role: str,
) -> str:
    if wanted in columns:
        return wanted
    if wanted == default:
        for key in fallbacks:
            if key in columns:
                return key
    raise UserInputError(
        f"{role} column {wanted!r} not found in dataset {source!r}; "
        f"available columns: {', '.join(columns) or '(none)'}"
    )


def _select_image_text(
    dataset: datasets.Dataset | datasets.IterableDataset,
    source: str,
    *,
    image_column: str,
    text_column: str,
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep only the image and caption columns, renamed to `image` and `text`, images as PIL."""
    columns = _column_names(dataset)
    image = _resolve_column(
        image_column, "image", WEBDATASET_IMAGE_KEYS, columns, source, role="image"
    )
    text = _resolve_column(text_column, "text", WEBDATASET_TEXT_KEYS, columns, source, role="text")
    if image == text:
        raise UserInputError(f"image and text columns are the same column {image!r}")
    feature = dataset.features.get(image) if dataset.features is not None else None
    encoded = isinstance(feature, datasets.Value) and feature.dtype in _ENCODED_IMAGE_DTYPES
    streamed_image = isinstance(dataset, datasets.IterableDataset) and (
        encoded or isinstance(feature, datasets.Image)
    )
    if streamed_image:
        # A streamed rename runs as a `map`, and a map decodes its inputs (datasets 5.2). Keep the
        # image encoded through it and decode only at the last step, where the cache builder can
        # switch decoding off: a corrupt image must be a skipped row, not a crash mid-iteration.
        dataset = dataset.cast_column(image, datasets.Image(decode=False))
    dataset = dataset.select_columns([image, text])
    renames = {old: new for old, new in ((image, "image"), (text, "text")) if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    if encoded or streamed_image:
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset
