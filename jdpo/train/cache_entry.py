"""One entry of an on-disk cache (the reference cache, the tokenised-data cache): an arrays file and a
manifest holding its SHA-256, written so that it never looks complete half-written and verified when read.

    <directory>/arrays.npz       the entry's numbers (np.savez bytes)
    <directory>/manifest.json    what the entry is (key, sizes, its ingredients) and "sha256" of arrays.npz

Locally an entry is written to a sibling temporary directory and renamed. On an object store (gs://...)
there is no rename (fsspec copies and deletes, which a reader can see half-way), but each object is
written whole or not at all, so the entry is written in place with the manifest last: an entry counts
only once its manifest exists, and then arrays.npz is complete. Two processes writing the same key write
identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from jdpo.paths import as_path, is_local

ARRAYS = "arrays.npz"
MANIFEST = "manifest.json"


def save_entry(directory: str | os.PathLike, raw: bytes, manifest: dict, *, replace: bool = False) -> None:
    """Write `raw` (the arrays file's bytes) and `manifest` (plus the SHA-256 of `raw`) as the entry at
    `directory`. `replace`: an existing (damaged) entry is swapped out (locally by two renames, so a
    reader sees the old or the new entry, never a mix); otherwise an existing entry is another process's
    identical result and is kept."""
    directory = as_path(directory)
    text = json.dumps({**manifest, "sha256": hashlib.sha256(raw).hexdigest()}, indent=2, sort_keys=True,
                      default=str)  # fmt: skip
    if not is_local(directory):
        if (directory / MANIFEST).exists() and not replace:
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ARRAYS).write_bytes(raw)
        (directory / MANIFEST).write_text(text)  # the commit marker: written after the arrays
        return
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ARRAYS).write_bytes(raw)
    (tmp / MANIFEST).write_text(text)
    if directory.exists():
        if not replace:
            shutil.rmtree(tmp)
            return
        bad = directory.with_name(f"{directory.name}.bad-{os.getpid()}")
        shutil.rmtree(bad, ignore_errors=True)
        directory.rename(bad)
        tmp.rename(directory)
        shutil.rmtree(bad, ignore_errors=True)
        return
    tmp.rename(directory)


def read_entry(directory: str | os.PathLike) -> tuple[dict | None, bytes | None, str | None]:
    """(manifest, arrays bytes, None) of the entry at `directory` when its checksum holds; (None, None,
    why) when it is unreadable or its arrays do not match the manifest's checksum; (None, None, None)
    when there is no entry."""
    directory = as_path(directory)
    if not (directory / MANIFEST).exists():
        return None, None, None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        raw = (directory / ARRAYS).read_bytes()
    except (OSError, ValueError) as e:
        return None, None, f"unreadable ({type(e).__name__}: {e})"
    if hashlib.sha256(raw).hexdigest() != manifest.get("sha256"):
        return None, None, f"{ARRAYS} does not match the checksum in {MANIFEST} (damaged or rewritten)"
    return manifest, raw, None
