"""Process memory under traffic of varying sizes: settings the engine applies itself on CPU.

Two things made a CPU server's RSS grow with every new request size and never come back:
  - glibc's heap: activations of a few hundred KB to a few hundred MB, freed in a different order
    than allocated, fragment the heap (and each of glibc's per-thread arenas), and glibc returns
    only the free top of each to the system. ``trim`` (``malloc_trim(0)``) returns every free page,
    holes included; the engine loop calls it when it goes idle after work, and at most every
    ``TRIM_EVERY_S`` of busy work (engine/core/loop.py), so RSS comes back to what is live and the
    hot path pays nothing. A few arenas (``ARENA_MAX``) bound how many heaps fragment.
    glibc's mmap and trim thresholds are left to glibc on purpose: setting either turns off its
    dynamic mmap threshold, and a fixed one (128 KiB was tried) makes every activation above it a
    fresh mapping, page-faulted in on each use: a third of MiniLM's throughput (bench/RESULTS.md).
  - oneDNN's primitive cache (one JIT-compiled primitive per GEMM shape, 1024 by default, each
    holding buffers that grow with the row count): capped here, and the packed GEMMs run at few
    row counts (cpu_linear.bucket_rows; the encoders pad their token rows once per batch, so no
    linear copies its input).
The settings are applied once, before the first GEMM (``pack_linears`` calls ``tune``); an environment
variable the user set wins (``MALLOC_ARENA_MAX``, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; glibc also reads
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` itself). Elsewhere than glibc (musl, macOS)
only the cache is capped and ``trim`` does nothing.
"""
import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("engine")

ARENA_MAX = 4  # glibc's default is 8 per core: each arena fragments on its own
PRIMITIVE_CACHE_CAPACITY = 64  # oneDNN primitives kept (bucketed shapes x layers of distinct sizes)
TRIM_EVERY_S = 10.0  # under sustained work, the loop trims at most this often

# glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8
_done = False
_libc_handle = None


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def tune() -> None:
    """Apply the settings above once per process (idempotent, cheap)."""
    global _done, _libc_handle
    if _done:
        return
    _done = True
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))  # read at first GEMM
    libc = _libc()
    if libc is None:
        return
    _libc_handle = libc
    if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(_M_ARENA_MAX, ARENA_MAX) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", ARENA_MAX)


def trim() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim(0)``: every arena, holes in
    the middle included): about 10 ms per 100 MiB handed back, microseconds when there is none. A no-op
    until ``tune`` ran (no packed CPU model in this process) and off glibc."""
    if _libc_handle is not None:
        _libc_handle.malloc_trim(0)
