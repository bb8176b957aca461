"""Process memory under traffic of varying sizes: settings the engine applies itself on CPU.

Two things made a CPU server's RSS grow with every new request size and never come back:
  - glibc's heap: activations of a few hundred KB to a few hundred MB, freed in a different order
    than allocated, fragment the heap (and each of glibc's per-thread arenas), and glibc returns
    little of it. Above ``MMAP_THRESHOLD`` an allocation gets its own mapping, unmapped on free;
    a fixed threshold (setting it turns off glibc's raising it after each large free), a trim
    threshold and a few arenas keep the heap small.
  - oneDNN's primitive cache (one JIT-compiled primitive per GEMM shape, 1024 by default): capped
    here, and the packed GEMMs run at few shapes (cpu_linear.bucket_rows).
Both are set once, before the first GEMM (``pack_linears`` calls ``tune``); an environment variable
the user set wins (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``,
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). Elsewhere than glibc (musl, macOS) only the cache is capped.
"""
import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("engine")

MMAP_THRESHOLD = 128 << 10  # bytes: larger allocations are mappings of their own, returned on free
TRIM_THRESHOLD = 32 << 20  # bytes of free heap top glibc keeps before returning it
ARENA_MAX = 4  # glibc's default is 8 per core: each arena fragments on its own
PRIMITIVE_CACHE_CAPACITY = 64  # oneDNN primitives kept (bucketed shapes x layers of distinct sizes)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_done = False


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def tune() -> None:
    """Apply the settings above once per process (idempotent, cheap)."""
    global _done
    if _done:
        return
    _done = True
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))  # read at first GEMM
    libc = _libc()
    if libc is None:
        return
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                              ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                              ("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENA_MAX)):
        if env not in os.environ and libc.mallopt(param, value) != 1:
            log.debug("mallopt(%d, %d) refused", param, value)

