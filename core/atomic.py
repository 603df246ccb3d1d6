"""Writes that a crash (or kill -9) cannot leave half done: to a temporary name, then renamed.

`os.replace` of a file, or of a folder onto a name that does not exist, is atomic on POSIX file
systems, so a reader sees either the old state or the new one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text` (UTF-8) or what it held before, never part of it."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file name beside `path` for the caller to write (any writer: numpy,
    safetensors, PIL); on success its bytes are flushed to disk and it replaces `path`, then the
    folder entry is flushed, so a power loss leaves the old file or the new one, never an empty
    one. On an exception `path` is untouched and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (an existing
    folder is moved aside first, then deleted). On an exception `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        for written in sorted(temporary.rglob("*")):
            _fsync(written)  # files and subfolders: their bytes and entries are on disk
        _fsync(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    if path.exists():
        os.replace(path, old)  # between these two renames `path` is briefly absent, never partial
    os.replace(temporary, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
