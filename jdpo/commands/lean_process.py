"""PyTorch kept out of a `jdpo` process that never uses it (the heap itself: `jdpo.parallel.host_memory`).

`transformers` imports PyTorch whenever it is installed (its configuration module imports it), for a
tokenizer and a config that never use it: ~0.2 GiB and ~2 s of every `jdpo train` on a machine that has
torch (`keep_torch_out`).
"""

from __future__ import annotations

import os
import sys


def keep_torch_out() -> bool:
    """Make `transformers` treat PyTorch as absent in this process (its `is_torch_available` is cached
    False), so importing it and loading a tokenizer do not import torch. Only for a process that runs no
    user code needing transformers' PyTorch models (not online DPO, whose reward function may). Returns
    False (and does nothing) when torch is already imported or transformers is already loaded."""
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]  # find_spec("torch") -> None, import fails
    # Without transformers' advice that "models won't be available": jdpo never asks it for one.
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in os.environ
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import import_utils

        return not import_utils.is_torch_available()
    finally:
        del sys.modules["torch"]  # code that imports torch itself later still can
        if quiet:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
