"""The host process's heap under XLA: glibc's malloc set for XLA's threads, and the compiler's freed heap
handed back to the system.

Measured on SmolLM2-135M (float32, 2 CPU cores, `experiments/bench/real_checkpoint.py`):
- glibc gives every thread that allocates an arena of its own and keeps what is freed there; XLA's
  compiler and its CPU runtime allocate from many threads, so a run's resident memory grew by freed
  buffers nobody reused. Two arenas (`limit_arenas`, before any thread starts) cut the peak by ~0.3 GiB.
- A compile leaves ~0.3 GiB of freed heap resident, and the step's buffers were then laid out beside it:
  the train step compiled in the process that runs it held 3.50 GiB at every step, 3.19 GiB when its
  program came from the compilation cache. `release_free_heap` after the compile (`OnMesh`'s
  `compile_apart`) returns it before the first step runs.
Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_arenas(n: int = 2) -> bool:
    """At most `n` glibc malloc arenas for this process (call before threads start); False where the
    allocator is not glibc's."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, n))


def release_free_heap() -> bool:
    """Hand the allocator's free memory back to the system (glibc's malloc_trim); False elsewhere."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
