"""Where a run's files live: a local directory, or an object store (`gs://bucket/run`) through `etils.epath`.

    out = as_path(config.train.output_dir)    # epath.Path: local stays local, gs:// goes through fsspec
    (out / "config.yaml").write_text(...)     # the same pathlib-like calls on every backend

Why epath: orbax (the checkpoints) already takes and returns `epath.Path`, and epath maps `gs://`,
`s3://`, `az://` onto fsspec (gcsfs / s3fs / adlfs), so one path type serves the checkpoints, the
metrics, the export and the reference cache, and a TPU pod writes to a bucket without a gcsfuse mount.
A local `epath.Path` is a `pathlib.PurePosixPath` on the OS backend: it compares equal to the
`pathlib.Path` of the same string and works with `open`, `os.listdir` and the rest.

Accepted: plain local paths, `file://` URLs (turned into the local path: orbax and tensorstore want one)
and epath's URLs (gs://, s3://, az://, hf://). Any other `scheme://` is refused here rather than
becoming a local directory named `scheme:` (epath has no backend for fsspec's `memory://` and the like).

What an object store guarantees, and what jdpo does about it:
- One object is written whole or not at all (a PUT replaces it atomically), but there is no rename
  (fsspec emulates it as copy + delete, visible half-way) and no append. So `rename`-based commits
  become "write the data, then the marker last" (the reference cache's manifest.json, orbax's
  commit_success file), and append-only files (metrics.jsonl, TensorBoard events) are rewritten whole
  from a local copy at `sync` points (see `jdpo.report.metrics`).
- Libraries that can only write local files (safetensors, tokenizers; tensorboardX, whose own gs://
  writer needs google-cloud-storage) write into a local temporary directory whose files are then
  copied over (`staged_dir` for the export, the TensorBoard writer's own for its events).
- A directory is only a name prefix: `mkdir` is a no-op on GCS and a directory "exists" once it holds
  an object.

Needs: gcsfs for gs:// (the `tpu` extra), s3fs for s3://; checkpoints go through orbax's tensorstore,
which writes local paths and gs:// only (`check_checkpoint_dir`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from jdpo.errors import UserError

if TYPE_CHECKING:
    from etils import epath

__all__ = [
    "OutputError",
    "as_path",
    "check_checkpoint_dir",
    "check_writable",
    "copy_file",
    "is_local",
    "staged_dir",
    "upload_dir",
]

#: URL schemes etils.epath has a backend for (fsspec: gcsfs, s3fs, adlfs, huggingface_hub).
EPATH_SCHEMES = ("gs", "s3", "az", "hf")
#: Where orbax's tensorstore can write checkpoints besides local paths.
CHECKPOINT_SCHEMES = ("gs",)

#: The fsspec package behind each epath URL scheme, and how to install it.
BACKENDS = {
    "gs": ("gcsfs", "pip install gcsfs (or jdpo's tpu extra)"),
    "s3": ("s3fs", "pip install s3fs"),
    "az": ("adlfs", "pip install adlfs"),
    "hf": ("huggingface_hub", "pip install huggingface_hub"),
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of `path` ('gs' for gs://bucket/x), None for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for a config string: a local path, a `file://` URL (as its local path) or an
    epath URL (gs://, s3://, az://, hf://). Raises ValueError for other URL schemes."""
    # Imported here: etils.epath costs ~0.1 s at import, which `jdpo --help` need not pay.
    from etils import epath

    if isinstance(path, epath.Path):
        return path
    s = os.fspath(path)
    kind = scheme(s)
    if kind is None:
        return epath.Path(s)
    if kind == "file":
        url = urlparse(s)
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"{s}: a file:// URL names a path on this machine (file:///abs/path)")
        return epath.Path(unquote(url.path))
    if kind in EPATH_SCHEMES:
        return epath.Path(s)
    known = ", ".join(f"{k}://" for k in EPATH_SCHEMES)
    raise ValueError(
        f"{s}: jdpo reads and writes local paths, file:// URLs and {known} (through etils.epath), "
        f"not {kind}://"
    )


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's file system (a `file://` URL included)."""
    return scheme(os.fspath(as_path(path))) is None


def check_checkpoint_dir(path: str | os.PathLike) -> None:
    """Raise ValueError when orbax cannot checkpoint to `path` (tensorstore's drivers: local, gs://)."""
    kind = scheme(os.fspath(as_path(path)))
    if kind is not None and kind not in CHECKPOINT_SCHEMES:
        raise ValueError(
            f"{path}: checkpoints are written by orbax (tensorstore), which supports local paths and "
            f"{', '.join(f'{k}://' for k in CHECKPOINT_SCHEMES)} only, not {kind}://"
        )


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two backends, streamed in 1 MiB pieces (one object written on close)."""
    src, dst = as_path(src), as_path(dst)
    with src.open("rb") as f, dst.open("wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)


def upload_dir(
    src: str | os.PathLike, dst: str | os.PathLike, *, prune: Callable[[str], bool] | None = None
) -> list[str]:
    """Copy the files under the local directory `src` to `dst` (any backend), keeping their relative
    paths; returns those paths. Then the files directly in `dst` that `prune(name)` selects and that were
    not just written are deleted (an earlier export's weight shards). Each file is its own object: a
    reader may see some files before others."""
    src, dst = os.fspath(src), as_path(dst)
    written = []
    for root, _, files in os.walk(src):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), src)
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_file(os.path.join(root, name), target)
            written.append(rel)
    if prune is not None and dst.exists():
        for old in dst.iterdir():
            if old.name not in written and prune(old.name):
                old.unlink()
    return written


@contextlib.contextmanager
def staged_dir(
    dst: str | os.PathLike, *, upload: bool = True, prune: Callable[[str], bool] | None = None
) -> Iterator[str]:
    """A local directory to write `dst`'s files into, for libraries that only write local files
    (safetensors, `tokenizer.save_pretrained`): `dst` itself when it is local, else a temporary
    directory whose files are copied to `dst` (`upload_dir`, with `prune`) when the block exits without
    an error, if `upload` (False on the processes that write nothing). Yields the local directory."""
    if is_local(dst):
        yield os.fspath(as_path(dst))
        return
    with tempfile.TemporaryDirectory(prefix="jdpo-stage-") as tmp:
        yield tmp
        if upload:
            upload_dir(tmp, dst, prune=prune)


class OutputError(UserError, ValueError):
    """An output location that cannot be written (names the setting or option and what to do)."""


def check_writable(path: str | os.PathLike, what: str, *, is_file: bool = False) -> None:
    """Raise OutputError, naming `what` (the setting or option, e.g. "train.output_dir"), unless jdpo can
    write `path`: a directory to write into (made if missing), or with `is_file` a file to create.

    Run before anything loads, so that a bad location costs no model load. A URL needs its scheme's
    fsspec backend importable (gcsfs for gs://; nothing is sent to the store). A local path needs its
    nearest existing ancestor to be a directory in which a file can be made: one is created and removed
    there (the one test that also catches read-only mounts and permissions root would not see). Nothing
    else is created."""
    import importlib.util

    s = os.fspath(path)
    try:
        kind = scheme(os.fspath(as_path(s)))
    except ValueError as e:
        raise OutputError(f"{what}: {e}") from None
    if kind is not None:
        module, install = BACKENDS[kind]
        if importlib.util.find_spec(module) is None:
            raise OutputError(f"{what} {s}: writing {kind}:// needs the {module} package: {install}")
        return
    target = os.path.abspath(os.fspath(as_path(s)))
    if os.path.isdir(target) if is_file else (os.path.exists(target) and not os.path.isdir(target)):
        kind_of = "a directory" if is_file else "a file"
        raise OutputError(f"{what} {s} is {kind_of}; give a {'file' if is_file else 'directory'} path")
    ancestor = os.path.dirname(target) if is_file else target
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"{what} {s}: {ancestor} is a file, so nothing can be written under it; choose "
                          "another location")  # fmt: skip
    try:
        fd, probe = tempfile.mkstemp(prefix=".jdpo-write-check-", dir=ancestor)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{what} {s}: cannot write in {ancestor} ({e.strerror or e}); choose a writable "
                          "location or change its permissions") from None  # fmt: skip
