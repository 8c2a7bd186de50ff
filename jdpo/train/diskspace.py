"""Free space on the run's filesystem: checked before the first checkpoint write, and named when a
write fails for lack of it (`jdpo.errors.NoSpaceError`).

Only a local filesystem says how much is free (`shutil.disk_usage`); on an object store (gs://) there is
no such number and no check. A write that fails is recognised as out of space by its errno (ENOSPC,
EDQUOT) or, for the libraries that wrap it in their own errors (tensorstore's RESOURCE_EXHAUSTED through
orbax, safetensors' StorageFull), by its text.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from jdpo.paths import scheme

_NO_SPACE_TEXT = ("no space left on device", "resource_exhausted", "storagefull", "disk quota exceeded")


def size_text(n: float) -> str:
    """Bytes for a message: 1000 B, 12.3 kB, 4.56 MB, 7.89 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def tree_bytes(tree: Any) -> int:
    """The bytes of a pytree of arrays (the whole arrays, over every shard)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def checkpoint_bytes(saved: Any) -> int:
    """About what one checkpoint of the arrays `saved` takes on disk: the arrays, plus 10% and 1 MB for
    orbax's metadata and file blocks (a tiny model's 272 kB of arrays take 420-440 kB on tmpfs)."""
    return int(tree_bytes(saved) * 1.1) + 1_000_000


def free_bytes(path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent); None
    where the filesystem does not say (an object store)."""
    text = os.fspath(path)
    if scheme(text) not in (None, "file"):
        return None
    p = Path(text.removeprefix("file://")).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def excerpt(e: BaseException, limit: int = 240) -> str:
    """The first line of `e`'s message, its start and end when long (where the OS error usually is)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"


def out_of_space(e: BaseException) -> bool:
    """`e` (or an error it was raised from) is a write that failed for lack of space."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False
