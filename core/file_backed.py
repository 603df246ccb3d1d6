"""A frozen module's weights as a private map of a file: resident only while something reads them.

A latent-cache stage never runs its pipeline's VAE during the steps (the cache holds its
encodings), yet the VAE's fp32 weights (SD's: 0.31 GiB) would stay in RAM beside the steps'
peak, and are needed again only for a sample grid or the next stage's cache. `FileBackedWeights`
writes a module's parameters and buffers to one unlinked file, once, and points them at a
private memory map of it (`torch.from_file`). Every reader sees the same tensors as before (CPU,
same dtype, shape and values), and the kernel reads a page in from the page cache when it is
first touched. `remap` maps the file afresh: whatever a use (a grid's decode) touched leaves the
process's resident set again. For frozen weights only: the map is private, and an in-place write
(which nothing in a frozen module's use does) would be undone by the next `remap`.

The file is unlinked from the start (reached through `/proc/self/fd`), so a crash or a
preemption leaves nothing on disk (on NFS, a `.nfs*` file until the client lets go). Linux only;
elsewhere, for weights not on the CPU (a GPU holds its own), and where the file cannot be written
or mapped (a full or read-only disk), `file_backed` leaves the module as it is. The pages read
in sit in the page cache, which the kernel reclaims under pressure; on a tmpfs run folder they
would be RAM all the same.
"""

from __future__ import annotations

import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn

ALIGNMENT = 64  # bytes: every tensor starts on a cache line, aligned for any dtype


@dataclass(frozen=True)
class _Slot:
    owner: str  # the submodule's path ("" for the module itself)
    name: str  # the parameter's or buffer's name in it
    is_parameter: bool
    offset: int  # in bytes, into the file
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class FileBackedWeights:
    """One module's parameters and buffers, written to an unlinked file in `directory`. Holds
    no reference to the module: `remap(module)` points it at a fresh map."""

    def __init__(self, module: nn.Module, directory: Path) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=directory, prefix="frozen-weights-")
        self._slots: list[_Slot] = []
        end = 0
        for owner, child in module.named_modules():
            tensors = [(n, t, True) for n, t in child.named_parameters(recurse=False)]
            tensors += [(n, t, False) for n, t in child.named_buffers(recurse=False)]
            for name, tensor, is_parameter in tensors:
                offset = -(-end // ALIGNMENT) * ALIGNMENT
                self._file.seek(offset)
                flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                self._file.write(memoryview(flat.numpy()))
                self._slots.append(
                    _Slot(owner, name, is_parameter, offset, tensor.dtype, tensor.shape)
                )
                end = offset + flat.numel()
        self._file.flush()
        self.size = end  # bytes
        self._mapped: torch.Tensor | None = None

    def holds(self, module: nn.Module) -> bool:
        """Whether `module`'s tensors are still the views of the current map, unwritten: a cast
        or a `.to()` since puts new tensors in their place, an in-place write (`load_state_dict`)
        changes them, and the file has neither."""
        return self._mapped is not None and _identity(module) == self._mapped_identity

    def remap(self, module: nn.Module) -> None:
        """Point `module`'s tensors at a new private map of the file; the old map (and the
        pages its readers touched) goes when nothing else holds a view of it."""
        if self.size == 0:
            return
        path = f"/proc/self/fd/{self._file.fileno()}"
        mapped = torch.from_file(path, shared=False, size=self.size, dtype=torch.uint8)
        for slot in self._slots:
            owner = module.get_submodule(slot.owner)
            view = mapped[slot.offset : slot.offset + slot.nbytes].view(slot.dtype)
            view = view.view(slot.shape)
            if slot.is_parameter:
                owner._parameters[slot.name].data = view  # the same Parameter, new storage
            else:
                owner._buffers[slot.name] = view
        self._mapped = mapped
        self._mapped_identity = _identity(module)

    def close(self) -> None:
        self._mapped = None
        self._file.close()


def _identity(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Where each tensor lives and how often it was written in place (`_version`)."""
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


# A module parked once is remapped, not written again, when a later stage parks it.
_PARKED: weakref.WeakKeyDictionary[nn.Module, FileBackedWeights] = weakref.WeakKeyDictionary()


def file_backed(module: nn.Module, directory: Path) -> bool:
    """Hold `module`'s weights as a private map of a file in `directory` (written on the first
    call for this module, mapped afresh on every call); False where it stays as it was (not
    Linux, weights not all on the CPU, or none)."""
    tensors = [*module.parameters(), *module.buffers()]
    if (
        not sys.platform.startswith("linux")
        or not tensors
        or any(t.device.type != "cpu" for t in tensors)
    ):
        return False
    weights = _PARKED.get(module)
    if weights is not None and not weights.holds(module):
        weights.close()
        weights = None
    try:
        if weights is None:
            weights = FileBackedWeights(module, directory)
            _PARKED[module] = weights
            weakref.finalize(module, weights._file.close)  # not `weights`: a stale one may go
        weights.remap(module)
    except OSError:  # a full or read-only disk, no /proc: the weights stay where they are
        if weights is not None:
            weights.close()
        _PARKED.pop(module, None)
        return False
    return True
