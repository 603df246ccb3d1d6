"""The host allocator: keep freed memory in the process for the next step to reuse.

With its defaults, glibc's malloc (2.36 here) serves every allocation above its mmap threshold
(dynamic, at most 32 MiB) with a fresh `mmap`, unmaps it on `free`, and trims the top of the heap
back to the kernel above 128 KiB. A training step on a CPU allocates and frees the same large
buffers every step: oneDNN's fp32 weight gradient of a 1280×1280×3×3 convolution is 59 MB,
autocast's bf16 weight copies are one per layer. So every step touches those buffers' pages for
the first time again, a page fault per 4 KiB. On the 2-core machines this project is developed
on, that weight gradient took 66 ms with glibc's defaults and 24 ms with freed memory kept, and a
512 px distillation step of SD v1.4 into the base student went from 15.2 to 11.0 s
(`benchmarks/sd_step.py --losses bk-sdm --gradient-checkpointing`, README, performance).

`keep_freed_memory` turns both off with `mallopt`, for the process and the data workers it
forks: freed blocks stay in the heap and the next step's allocations of the same sizes reuse
them. PyTorch's CPU tuning guide reaches the same end by preloading jemalloc or tcmalloc; this
needs no library and no re-exec. `SD_DISTILL_MALLOC=system` leaves glibc's defaults (to measure
the difference).

The price: what a phase freed stays resident until something reuses it, and a later phase that
allocates other sizes (a checkpoint's copies, the next stage's models, the exported pipeline)
grows the heap beside those holes: BK-SDM's side-by-side run ended 0.85 GB above its training
steps' peak. `release_freed_memory` (`malloc_trim`) hands the free pages back between phases; the
trainer calls it before each of them, so only the steps run with memory kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Trim only above 2 GiB free at the heap's top (mallopt takes an int: this is its largest).
TRIM_ABOVE = 2**31 - 1
SETTING_VARIABLE = "SD_DISTILL_MALLOC"


def keep_freed_memory() -> bool:
    """Keep freed memory in the heap (no mmap'd blocks, no trimming). True where applied: on
    Linux with glibc, unless `SD_DISTILL_MALLOC=system`; elsewhere (macOS, musl) a no-op."""
    libc = _glibc()
    if libc is None or os.environ.get(SETTING_VARIABLE, "").lower() == "system":
        return False
    # mallopt returns 1 on success. Trim first: a heap that may not shrink is what makes the
    # blocks that no longer go to mmap reusable.
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)) and bool(libc.mallopt(M_MMAP_MAX, 0))


def release_freed_memory() -> bool:
    """Return the heap's free pages to the kernel (glibc's `malloc_trim(0)`, which also releases
    free blocks inside the heap, not only at its top): before a phase that allocates differently
    from the steps. True where some memory was released; a no-op without glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc on Linux, else None."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # absent from musl and other libcs  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc
