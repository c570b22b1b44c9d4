"""Process-wide tuning for a serving worker: glibc's heap, torch's threads, the CPU matmul.

Nothing here runs on import, and ``samserve`` modules never tune the process themselves:
the TorchServe handler calls ``tune_process`` once, at worker initialization, and
benchmarks that build an engine in-process call it as the handler does.
``release_freed_memory`` is the one call made again later, after encoder runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import matmul

MIB = 1024 * 1024

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD_MAX = 32 * MIB  # glibc's ceiling on 64-bit


@dataclass(frozen=True)
class ProcessTuning:
    """What ``tune_process`` left in effect, for the worker log.

    Attributes:
      threads (int): torch's intra-op threads.
      cpu_matmul (str): the backend of float32 products on a CPU, ``onednn`` or ``torch``
        (``samserve.matmul.backend``).
      heap_kept (bool): whether glibc's heap keeps freed blocks (``keep_freed_memory``);
        False where the C library is not glibc.
      openmp_warning (str | None): ``openmp_spin_warning`` for the worker's environment.
    """

    threads: int
    cpu_matmul: str
    heap_kept: bool
    openmp_warning: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """One phrase for a log line: ``4 torch threads, CPU matmul onednn, heap kept``."""
        heap = "heap kept" if self.heap_kept else "heap left to the C library"
        return f"{self.threads} torch threads, CPU matmul {self.cpu_matmul}, {heap}"


def tune_process(
    device: torch.device,
    threads: int,
    cpu_matmul: str = "auto",
    environ: Mapping[str, str] | None = None,
) -> ProcessTuning:
    """Set up the process for serving on ``device``, once, before the model is built.

    In order: glibc's heap keeps freed blocks (before torch starts threads, which would
    get arenas of their own); on a CPU, torch runs ``threads`` intra-op threads and its
    float32 products go through ``cpu_matmul``. On other devices torch keeps its own
    thread count and products, as the model multiplies there.

    Arguments:
      device (torch.device): where the model will run.
      threads (int): torch's intra-op threads on a CPU, at least 1.
      cpu_matmul (str): one of ``samserve.matmul.BACKENDS``, used on a CPU.
      environ (Mapping[str, str] | None): the environment the OpenMP warning reads;
        None: ``os.environ``.

    Returns:
      (ProcessTuning): the threads, backend and heap now in effect, and the OpenMP
        warning for the log (None when the environment sets a wait policy).
    """
    matmul.check_backend(cpu_matmul)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    heap_kept = keep_freed_memory()
    if device.type == "cpu":
        torch.set_num_threads(threads)
        matmul.set_backend(cpu_matmul)
    return ProcessTuning(
        threads=torch.get_num_threads(),
        cpu_matmul=matmul.backend(),
        heap_kept=heap_kept,
        openmp_warning=openmp_spin_warning(os.environ if environ is None else environ),
    )


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded on first use; None where the C library has no ``mallopt``."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Let glibc's heap keep freed blocks for reuse, up to its ceiling for the ``mmap``
    threshold (``mallopt``), in one arena for all threads. Call it before the process
    starts threads (``tune_process`` does).

    Every decoder op makes tensors the size of a prompt's image tokens (NxC); by default
    glibc serves many of them with fresh ``mmap`` s and unmaps them on free, so every op
    would page-fault its output in again. Threads other than the main one get arenas of
    their own, whose heaps glibc unmaps whenever they fall empty, whatever the trim
    threshold, and the service's pool threads decode and make masks: one arena keeps
    those pages too. ``release_freed_memory`` hands the heap back after encoder runs, so
    the RSS still follows what the caches hold.

    Returns:
      (bool): whether the heap now keeps freed blocks (False without glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return True


def openmp_spin_warning(environ: Mapping[str, str]) -> str | None:
    """A warning for the worker log when ``environ`` (the worker's environment) sets no
    OpenMP wait policy, else None.

    libgomp reads ``GOMP_SPINCOUNT`` and ``OMP_WAIT_POLICY`` once, when torch loads, so
    the process that starts TorchServe must set them. By default torch's idle OpenMP
    threads spin for 300,000 pauses after each op, on the cores the service's pool
    threads decode prompts and encode masks on.
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
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
