"""The project's own CPU kernels: C++ sources built on first use with the machine's g++.

A kernel here is a plain C ABI over raw pointers (no torch headers), so building one is a
one-second compiler call rather than a PyTorch extension build, and it is loaded with ctypes,
which releases the GIL during the call: the caller runs one call per thread to use every core.
A build is cached by the hash of its source, flags and compiler, so a changed source rebuilds
and machines sharing a home directory never load another's build. Where there is no compiler,
no x86 CPU with the instructions, or the build fails, `load` returns None and the caller keeps
PyTorch's own kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
CACHE_VARIABLE = "SD_DISTILL_KERNEL_CACHE"
# AVX512-BF16's dot product (vdpbf16ps) and the AVX512 subsets its intrinsics use.
AVX512_BF16_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
AVX512_BF16_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them ('' elsewhere: no kernel is then used)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> Path:
    root = os.environ.get(CACHE_VARIABLE) or os.environ.get("XDG_CACHE_HOME")
    return (
        Path(root) / "sd-distill" / "kernels" if root else Path.home() / ".cache/sd-distill/kernels"
    )


@functools.cache
def load(
    name: str, flags: tuple[str, ...], cpu_flags_needed: tuple[str, ...]
) -> ctypes.CDLL | None:
    """The built library of `core/kernels/<name>.cpp`, or None where it cannot run here."""
    if platform.machine() not in ("x86_64", "AMD64") or not set(cpu_flags_needed) <= cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        logger.info("no C++ compiler: %s falls back to PyTorch's kernel", name)
        return None
    source = SOURCE_DIR / f"{name}.cpp"
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", *flags]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256(source.read_bytes() + repr((command, version)).encode()).hexdigest()
        built = cache_dir() / f"{name}-{key[:16]}.so"
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            # Built under a temporary name and renamed: processes building at once (test
            # workers, DDP ranks) each rename a complete file, never load a partial one.
            with tempfile.TemporaryDirectory(dir=built.parent) as scratch:
                partial = Path(scratch) / built.name
                subprocess.run(
                    [*command, "-o", str(partial), str(source)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                os.replace(partial, built)
        return ctypes.CDLL(str(built))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("building %s failed, PyTorch's kernel is used: %s", name, detail.strip())
        return None
