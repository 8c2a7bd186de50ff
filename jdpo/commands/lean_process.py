"""A `jdpo` process's memory: glibc's allocator set for XLA's threads, and PyTorch kept out of a run that
never uses it.

Measured on SmolLM2-135M (float32, 2 CPU cores; `experiments/bench/real_checkpoint.py`):
- glibc gives every thread that allocates an arena of its own and keeps what is freed there; XLA's
  compiler and its CPU runtime allocate from many threads, so a run's resident memory grew by freed
  buffers nobody reused. Two arenas (`limit_arenas`, before any thread starts) cut the peak by ~0.3 GiB.
- `transformers` imports PyTorch whenever it is installed (its configuration module imports it), for a
  tokenizer and a config that never use it: ~0.2 GiB and ~2 s of every `jdpo train` on a machine that
  has torch (`keep_torch_out`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc():
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_arenas(n: int = 2) -> bool:
    """At most `n` glibc malloc arenas for this process (call before threads start); False where the
    allocator is not glibc's."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, n))


def keep_torch_out() -> bool:
    """Make `transformers` treat PyTorch as absent in this process (its `is_torch_available` is cached
    False), so importing it and loading a tokenizer do not import torch. Only for a process that runs no
    user code needing transformers' PyTorch models (not online DPO, whose reward function may). Returns
    False (and does nothing) when torch is already imported or transformers is already loaded."""
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]  # find_spec("torch") -> None, import fails
    try:
        from transformers.utils import import_utils

        return not import_utils.is_torch_available()
    finally:
        del sys.modules["torch"]  # code that imports torch itself later still can
