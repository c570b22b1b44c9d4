"""Process-wide tuning for a serving worker: glibc's heap, OpenMP's idle threads.

Nothing here runs on import; ``samserve`` modules never call these functions themselves.
The TorchServe handler calls them once, at worker initialization (benchmarks and tests
that build an engine in-process do the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Mapping

MIB = 1024 * 1024


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD_MAX = 32 * MIB  # glibc's ceiling on 64-bit


def keep_freed_memory() -> None:
    """Let glibc's heap keep freed blocks for reuse, up to its ceiling for the ``mmap``
    threshold (``mallopt``), in one arena for all threads. Call it before the process
    starts threads.

    Every decoder op makes tensors the size of a prompt's image tokens (NxC); by default
    glibc serves many of them with fresh ``mmap`` s and unmaps them on free, so every op
    would page-fault its output in again. Threads other than the main one get arenas of
    their own, whose heaps glibc unmaps whenever they fall empty, whatever the trim
    threshold, and the mask threads decode and make masks: one arena keeps those pages
    too. ``release_freed_memory`` hands the heap back after encoder runs, so the RSS
    still follows what the caches hold.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, 1)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def openmp_spin_warning(environ: Mapping[str, str]) -> str | None:
    """A warning for the worker log when ``environ`` (the worker's environment) sets no
    OpenMP wait policy, else None.

    libgomp reads ``GOMP_SPINCOUNT`` and ``OMP_WAIT_POLICY`` once, when torch loads, so
    the process that starts TorchServe must set them. By default torch's idle OpenMP
    threads spin for 300,000 pauses after each op, on the cores the mask threads make
    and encode masks on.
    """
    if {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(environ):
        return None
    return (
        "GOMP_SPINCOUNT is not set: after each torch op its idle OpenMP threads spin "
        "for up to 300,000 pauses, taking cores from the mask threads; start "
        "TorchServe with GOMP_SPINCOUNT=20000 (scripts/serve.py does) for faster clicks"
    )


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    An encoder run frees its activations and the cache evicts whole embeddings; the heap
    keeps them (see ``keep_freed_memory``), so the worker's RSS would drift above what the
    caches hold. Trimming walks the heap and the next op faults its pages back in, so it
    runs after encoder runs (which free the most), not after clicks.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
