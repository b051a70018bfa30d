"""Host memory reuse: keep the blocks a training step frees for the next step.

PyTorch's CPU tensors come from ``malloc``. glibc's ``malloc`` serves a block larger than its
mmap threshold with a fresh ``mmap`` and gives it back with ``munmap`` when the tensor is freed.
The threshold starts at 128 KiB and rises to the size of each such block freed, but never above
32 MiB. So every step of a training loop allocates its large tensors again as new mappings, and
the kernel faults them in page by page, zeroing every 4 KiB page, the first time they are
written. On a virtual machine a fault costs microseconds: measured on this project's 2-core
AMD EPYC VM (one process, 7 interleaved steps each, the setting applied halfway), eager
SpikingJelly's CSNN step at T=16 (batch 16, 3x32x32) faulted in 58 000 pages and took 233 ms;
with the blocks kept, 586 pages and 153 ms. ``CompiledModule.report()`` says when a compiled
step's largest tensor reaches the 32 MiB ceiling.

:func:`reuse_host_memory` sets glibc's mmap threshold to ``max_block_bytes`` and its trim
threshold to twice that, at most 2**31 - 1 (``mallopt(M_MMAP_THRESHOLD)``,
``M_TRIM_THRESHOLD``): blocks up to that size then come from the heap, and freed ones stay
there for the next allocation, as PyTorch's CUDA caching allocator does for GPU memory. The
price is that the process keeps its high-water mark of heap memory instead of returning it
between steps.

This is a setting of the whole process (every tensor, every library), and glibc has no way to
restore the dynamic threshold once it is fixed, so nothing here turns it back off. The same
effect without code: ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:``
``glibc.malloc.trim_threshold=2147483647`` in the environment before Python starts, or another
allocator (jemalloc, tcmalloc) through ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

__all__ = [
    "HostMemoryError",
    "HostMemorySetting",
    "large_tensor_note",
    "minor_page_faults",
    "reuse_host_memory",
]

#: glibc's ``mallopt`` parameter numbers (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: glibc caps the mmap threshold at ``HEAP_MAX_SIZE / 2``: 32 MiB on 64-bit systems.
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


#: What :func:`reuse_host_memory` set in this process, if it ran.
_applied: HostMemorySetting | None = None


class HostMemoryError(RuntimeError):
    """The process's ``malloc`` cannot be told to keep freed blocks (it is not glibc's)."""


@dataclass(frozen=True)
class HostMemorySetting:
    """What :func:`reuse_host_memory` set.

    Attributes:
        mmap_threshold: blocks up to this many bytes now come from the heap.
        trim_threshold: free heap memory up to this many bytes is kept, not returned.
        glibc_version: the glibc whose ``malloc`` was configured.
    """

    mmap_threshold: int
    trim_threshold: int
    glibc_version: str


def _glibc() -> tuple[ctypes.CDLL, str]:
    """The process's C library when it is glibc and its ``malloc`` is glibc's own."""
    try:
        process = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no process-wide symbol table to open
        process = None
    version_fn = getattr(process, "gnu_get_libc_version", None)
    if version_fn is None:
        raise HostMemoryError(
            "snncompile.runtime.reuse_host_memory needs glibc's malloc; this process's C library "
            "is not glibc. Use the allocator's own settings instead (e.g. jemalloc's "
            "MALLOC_CONF=retain:true)."
        )
    version_fn.restype = ctypes.c_char_p
    version = version_fn().decode()
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(libc_name)
    # With jemalloc or tcmalloc in LD_PRELOAD, the process's `malloc` is not libc's, and libc's
    # mallopt would configure an allocator nobody calls.
    process_malloc = ctypes.cast(process.malloc, ctypes.c_void_p).value
    libc_malloc = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    if process_malloc != libc_malloc:
        raise HostMemoryError(
            "snncompile.runtime.reuse_host_memory: this process's malloc is not glibc's (an "
            "allocator was preloaded, e.g. jemalloc or tcmalloc), so glibc's mallopt would not "
            "change anything. Configure that allocator instead; most keep freed memory already."
        )
    return libc, version


def reuse_host_memory(max_block_bytes: int = 1 << 30) -> HostMemorySetting:
    """Make glibc keep freed blocks up to ``max_block_bytes`` for reuse (see the module doc).

    Call it once, before training; later steps then reuse the memory earlier steps freed instead
    of faulting fresh pages in. It affects the whole process and stays in effect until it exits.

    Args:
        max_block_bytes: the largest block served from the heap; larger ones stay mmap'd. At
            least 32 MiB, glibc's own dynamic ceiling (a lower fixed threshold would map more
            blocks afresh, not fewer).

    Returns:
        The thresholds set.

    Raises:
        HostMemoryError: the process's ``malloc`` is not glibc's.
        ValueError: ``max_block_bytes`` is not an ``int`` from 32 MiB to below 2**62.
    """
    if (
        not isinstance(max_block_bytes, int)
        or isinstance(max_block_bytes, bool)
        or not _GLIBC_MMAP_THRESHOLD_MAX <= max_block_bytes < 2**62
    ):
        raise ValueError(
            f"reuse_host_memory(max_block_bytes={max_block_bytes!r}): give the largest block "
            "to keep in bytes, an int of at least 32 MiB (e.g. 1 << 30); a fixed threshold "
            "below glibc's dynamic ceiling would map more blocks afresh, not fewer"
        )
    libc, version = _glibc()
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    int_max = 2**31 - 1  # mallopt takes an int
    mmap_threshold = min(max_block_bytes, int_max)
    trim_threshold = min(2 * max_block_bytes, int_max)
    # mallopt returns 1 on success and 0 when glibc refuses the value; older glibc refuses an
    # mmap threshold above its dynamic ceiling, which still beats the dynamic threshold.
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        mmap_threshold = min(mmap_threshold, _GLIBC_MMAP_THRESHOLD_MAX)
        trim_threshold = 2 * mmap_threshold
        if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
            raise HostMemoryError(
                f"glibc {version} refused mallopt(M_MMAP_THRESHOLD, {mmap_threshold}); try a "
                "smaller max_block_bytes"
            )
    if libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        raise HostMemoryError(
            f"glibc {version} refused mallopt(M_TRIM_THRESHOLD, {trim_threshold})"
        )
    global _applied
    _applied = HostMemorySetting(mmap_threshold, trim_threshold, version)
    return _applied


def large_tensor_note(largest_bytes: int) -> str | None:
    """A line for ``CompiledModule.report()`` when a step's tensors are faulted in afresh.

    Returns ``None`` unless the largest tensor of the compiled step (``largest_bytes``, at the
    example input) reaches glibc's 32 MiB mmap ceiling while glibc's dynamic threshold is in
    effect: not after :func:`reuse_host_memory`, not when the environment sets the threshold
    (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``), not under another allocator.
    """
    # A block's chunk is its size plus a header and alignment slack: a 32 MiB tensor is mapped.
    if largest_bytes + 4096 <= _GLIBC_MMAP_THRESHOLD_MAX or _applied is not None:
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return None
    try:
        _glibc()
    except (HostMemoryError, OSError, AttributeError, TypeError):
        return None
    return (
        f"host memory: the step's largest tensor is {largest_bytes / 2**20:.0f} MiB, at or "
        "above glibc's 32 MiB mmap ceiling, so every step maps it afresh and faults it in page by "
        "page; snncompile.runtime.reuse_host_memory() keeps freed blocks for the next step "
        "(docs/kernels.md, 'Page faults')"
    )


def minor_page_faults() -> int:
    """Minor page faults of this process so far (``getrusage``): the difference over a step is
    how many fresh pages the step touched."""
    import resource  # POSIX only; imported here so that the module imports everywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
