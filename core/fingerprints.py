"""Fingerprints: content hashes of model weights, so no number outlives the weights behind it.

A folder's fingerprint is a sha256 over the relative path and content of every weight and config
file in it (`*.safetensors`, `*.json`, tokenizer `*.txt`): a retrained model saved at the same
path, a changed scheduler config or a swapped VAE all change it, a copy to another path does not.

Hashing SD v1.4's 4 GB takes seconds, so each file's digest is cached by (path, size, mtime_ns) in
`$SD_DISTILL_CACHE/fingerprints.json`: a rerun on unchanged files reads only that index. A model
held in memory (a pipeline object) is fingerprinted from its state dicts instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from core.atomic import write_text_atomic
from core.errors import UserInputError
from core.paths import default_cache_root

FINGERPRINTED_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
INDEX_FILE = "fingerprints.json"
_CHUNK = 16 * 1024**2


def file_digest(path: Path, index_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, from the index when its size and mtime are unchanged."""
    path = path.resolve()
    stat = path.stat()
    index_file = (index_dir or default_cache_root()) / INDEX_FILE
    index = _read_index(index_file)
    entry = index.get(str(path))
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    _record(index_file, str(path), entry)
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path, index_dir: Path | None = None) -> str:
    """sha256 over (relative path, digest) of every weight and config file below `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"cannot fingerprint {str(folder)!r}: not a folder")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in FINGERPRINTED_SUFFIXES
    )
    if not any(p.suffix == ".safetensors" for p in files):
        raise UserInputError(f"cannot fingerprint {str(folder)!r}: it holds no .safetensors")
    combined = hashlib.sha256()
    for path in files:
        relative = path.relative_to(folder).as_posix()
        combined.update(f"{relative}\0{file_digest(path, index_dir)}\n".encode())
    return combined.hexdigest()


def modules_fingerprint(named_modules: Iterable[tuple[str, Any]]) -> str:
    """sha256 over the state dicts and configs of in-memory models, e.g. a pipeline's components
    (`pipeline.components.items()`); components without weights contribute their config."""
    digest = hashlib.sha256()
    for name, module in sorted(named_modules, key=lambda item: item[0]):
        digest.update(f"{name}\0".encode())
        if isinstance(module, torch.nn.Module):
            for key, tensor in sorted(module.state_dict().items()):
                flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(flat.view(torch.uint8).numpy())
        config = getattr(module, "config", None)
        if config is not None:
            items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            digest.update(json.dumps(items, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def pipeline_fingerprint(model: Any, index_dir: Path | None = None) -> str:
    """The fingerprint of a pipeline folder, or of a loaded pipeline object's components."""
    if isinstance(model, str | os.PathLike) and Path(model).is_dir():
        return folder_fingerprint(model, index_dir)
    components = getattr(model, "components", None)
    if components is None:
        raise UserInputError(f"cannot fingerprint {model!r}: neither a folder nor a pipeline")
    return modules_fingerprint(components.items())


def short(fingerprint: str | None) -> str:
    """The first 12 hex digits, for reports and log lines."""
    return fingerprint[:12] if fingerprint else "none"


def _read_index(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _record(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one file's entry to the index. Every process of a run (and every run sharing the cache)
    fingerprints the same teachers: under the lock one writer at a time reads the index as it is
    now and writes it back with its entry, so no writer drops another's."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_name(f"{path.name}.lock")), timeout=60):
            index = _read_index(path)
            index[key] = entry
            write_text_atomic(path, json.dumps(index, sort_keys=True))
    except (OSError, Timeout):
        pass  # the index only saves time; a read-only cache folder costs a rehash next time


def metrics_fingerprints(metrics: dict[str, Any]) -> dict[str, str]:
    """Row name -> fingerprint of the pipeline whose metrics that row holds, read from a loaded
    metrics.json: {"teacher": ..., "student": ...}. Rows without one (published reference rows,
    files written before fingerprints existed) are absent, so a caller comparing
    `metrics_fingerprints(data).get("student")` with the fingerprint of the weights it holds gets
    None, never a false match. The student row's fidelity FID also depends on the teacher's
    weights, recorded under "teacher"."""
    fingerprints = {}
    for row in metrics.get("rows", []):
        fingerprint = row.get("fingerprint") if isinstance(row, dict) else None
        if isinstance(fingerprint, str) and fingerprint:
            # A student scored at several step counts has a row for each ("student, 4 steps"),
            # all of one model: keyed by the model.
            fingerprints[row.get("model") or row["name"]] = fingerprint
    return fingerprints
