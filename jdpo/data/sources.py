"""Reading raw rows from local files, `datasets` directories and (when reachable) the hub.

Every reader yields `(where, row)` pairs: `where` names the file and line (or row) in words so that a
bad row can be reported precisely ("data/train.jsonl:17"), `row` is a plain dict of column -> value.
Nothing here knows about preference formats; that is `formats.py`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from jdpo.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(UserError, ValueError):
    """Bad input data: the message names the file, the line or row, and the field."""


@dataclass(frozen=True)
class SourceSpec:
    """One entry of a mixture: `path`, `path:5000` (a count) or `path:0.25` (a fraction).

    count / fraction larger than the source repeats its rows (upsampling), deterministically.
    """

    path: str
    count: int | None = None
    fraction: float | None = None

    def take(self, n: int, rng: np.random.Generator) -> list[int]:
        """The indices of this entry's amount of a source of `n` records: all of them without an amount,
        else a subset drawn with `rng` (above 100%: whole copies plus a subset), in source order. The one
        rule for amounts, of preference records and of online prompts alike."""
        if self.count is None and self.fraction is None:
            return list(range(n))
        want = self.count if self.count is not None else int(round(self.fraction * n))
        if n == 0:
            return []
        copies, rest = divmod(want, n)
        keep = np.sort(rng.permutation(n)[:rest])
        return list(range(n)) * copies + keep.tolist()


_AMOUNT = re.compile(r"^(.*):(\d+(?:\.\d*)?|\.\d+)$")


def parse_source_spec(spec: str | SourceSpec) -> SourceSpec:
    """Parse `path[:count|:fraction]`; an integer is a count, a number with a point a fraction."""
    if isinstance(spec, SourceSpec):
        return spec
    spec = spec.strip()
    m = _AMOUNT.match(spec)
    # A path that exists as written wins over the amount syntax (a file may contain a colon).
    if m is None or os.path.exists(spec):
        return SourceSpec(spec)
    path, amount = m.group(1), m.group(2)
    if "." in amount:
        return SourceSpec(path, fraction=float(amount))
    return SourceSpec(path, count=int(amount))


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _hub_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    """A quick TCP connect to the hub endpoint, so that an offline machine fails in seconds, not after
    the hub client's retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, ""
    except OSError as e:
        return False, f"cannot connect to {host}:{port}: {e}"


def _offline_error(name: str, why: str) -> DataError:
    return DataError(
        f"{name!r} is not a local file or directory, and the Hugging Face hub is not reachable ({why}). "
        "Pass a local path instead: a .jsonl/.json/.parquet/.csv file, a directory of such files, "
        "or a directory written by datasets.Dataset.save_to_disk."
    )


def _not_utf8(where: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{where}: not valid UTF-8 (byte {e.object[e.start]:#04x} at byte {e.start + 1} of the "
                     "line); re-save the file as UTF-8")  # fmt: skip


def _decode_line(raw: bytes, where: str, first: bool) -> str | DataError:
    """One line's text; a UTF-8 byte-order mark (what some editors write first) is accepted."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return _not_utf8(where, e)


def _read_text(path: Path) -> str:
    """A whole file's text, BOM accepted; invalid UTF-8 names the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        start = raw.rfind(b"\n", 0, e.start) + 1
        e = UnicodeDecodeError(e.encoding, raw[start : e.end], e.start - start, e.end - start, e.reason)
        raise _not_utf8(f"{path}:{lineno}", e) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode_line(raw, where, lineno == 1)
            if isinstance(line, DataError):
                yield where, line
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            yield where, row


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file that is really JSON lines is common; read it as such.
        if e.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]} wrappers, or a dict of equal-length columns.
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            data = next(iter(lists.values()))
        elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
        else:
            raise DataError(f"{path}: expected a JSON array of objects (or a dict of columns)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} item {i}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _maybe_json_cell(value: Any) -> Any:
    # CSV cannot hold lists; message lists arrive as JSON text. Decode only what looks like JSON.
    if isinstance(value, str) and value[:1] in "[{" and value[-1:] in "]}":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # line_num is the physical line where this record ended (after multi-line cells).
            yield f"{path}:{reader.line_num}", {k: _maybe_json_cell(v) for k, v in row.items()}


def _read_dataset(ds: Any, name: str) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(ds):
        yield f"{name} row {i}", dict(row)


def _pick_split(dsd: Any, split: str | None, name: str) -> Any:
    keys = list(dsd.keys())
    if split is None:
        split = "train" if "train" in keys else keys[0]
    if split not in keys:
        raise DataError(f"{name}: no split {split!r}; it has {keys}")
    return dsd[split]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def read_rows(path: str, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield `(where, row)` for every row of one source.

    Args:
      path: a .jsonl/.json/.parquet/.csv file; a directory written by `save_to_disk` (Dataset or
        DatasetDict; `split` picks from a DatasetDict, default "train"); a directory of data files
        (read in sorted order; when `split` is given only files whose name contains it); or a hub
        dataset name, loaded with `datasets.load_dataset` when the hub is reachable.
    Yields `row` as a dict, or a `DataError` instance in place of a row that could not be parsed,
    so the caller decides whether to stop or to skip.
    """
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(p)
        elif suffix == ".json":
            yield from _read_json(p)
        elif suffix == ".parquet":
            yield from _read_parquet(p)
        elif suffix == ".csv":
            yield from _read_csv(p)
        else:
            raise DataError(f"{p}: unsupported file type {suffix!r}; use one of {FILE_SUFFIXES}")
        return
    if p.is_dir():
        if _is_saved_dataset(p):
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, str(p))
            yield from _read_dataset(ds, str(p))
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
        if split is not None and any(split in f.name for f in files):
            files = [f for f in files if split in f.name]
        if not files:
            raise DataError(f"{p}: directory holds no {'/'.join(FILE_SUFFIXES)} files and no saved dataset")
        for f in files:
            yield from read_rows(str(f))
        return
    yield from _read_hub(path, split)


def _read_hub(name: str, split: str | None) -> Iterator[tuple[str, dict]]:
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix.lower() in FILE_SUFFIXES
    if looks_local:
        raise DataError(f"{name}: no such file or directory")
    if _hub_offline():
        raise _offline_error(name, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set")
    reachable, why = _hub_reachable()
    if not reachable:
        raise _offline_error(name, why)
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except (ConnectionError, TimeoutError, OSError) as e:
        raise _offline_error(name, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # the hub client wraps network failures in its own types
        if any(w in f"{type(e).__name__} {e}".lower() for w in ("connect", "offline", "timeout", "resolve")):
            raise _offline_error(name, f"{type(e).__name__}: {e}") from None
        raise
    yield from _read_dataset(ds, f"{name}[{split or 'train'}]")
