"""The tokenised-data cache: a run's splits tokenised once, reused by every later start and resume.

An offline run reads and tokenises its whole dataset before anything trains; on a mix of a million pairs
that is minutes at every start and every resume. `OfflineData.load` asks `load_or_build` instead: the
tokenised splits (train and eval `TokenizedPairs` with their reports and what the readers dropped) are
stored under `<cache_dir>/tokens/<key>/` (`cache_dir`: the reference cache's, `dpo.cache_dir`, by default
`<output_dir>/../.jdpo_refcache`), an entry like the reference cache's (`jdpo.train.cache_entry`: written
atomically, its arrays checksummed in the manifest).

The key is a SHA-256 over everything the token ids depend on: the tokenizer's serialisation and special
tokens, its chat template, `data.chat_template_kwargs`, the content of every data file (SHA-256 of each
file; a `datasets` directory or a directory of files: of every file in it, with its relative path), the
source specs with their amounts, the format, the length settings, the eval split's settings, the seed
(sub-sampling and the held-out split), the loss's record kind (pairs, or unpaired examples), the
tokenisation code's version and the transformers / tokenizers versions. A source that is not a local
path (a hub dataset name) has no content to hash here, so such a run is not cached (and tokenises as
before). An entry is verified before use: its checksum, its key, and the pairs' own fingerprints against
the manifest's; a damaged or stale entry is rebuilt and swapped in. `data.token_cache: false` turns the
cache off.

Every process decides for itself (tokenisation has no collective); only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import tokenizers
import transformers

from jdpo.config import Config
from jdpo.data import TokenizedPairs, TokenizeReport
from jdpo.data.sources import parse_source_spec
from jdpo.paths import as_path
from jdpo.train import cache_entry
from jdpo.train.refcache import tokenizer_fingerprint

log = logging.getLogger(__name__)

SUBDIR = "tokens"
# The tokenisation rules' version (`jdpo.data.tokenize`, `jdpo.data.chat`, the readers): bump it when a
# change there gives other ids for the same data, so old entries are not reused.
TOKENIZE_VERSION = 1
_SPLITS = ("train", "eval")


@dataclass
class TokenizedSplits:
    """What the data stage of an offline run produces: the tokenised splits (eval None without one), their
    reports, and the rows the format readers dropped per split (reason -> count)."""

    train: TokenizedPairs
    train_report: TokenizeReport
    eval: TokenizedPairs | None
    eval_report: TokenizeReport | None
    dropped: dict[str, dict[str, int]]


# ------------------------------------------------------------------------------------------------
# The key
# ------------------------------------------------------------------------------------------------


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_fingerprint(path: str) -> str | None:
    """The SHA-256 of a source's content: a file's bytes, or a directory's files (relative path and bytes,
    in sorted order: a `datasets` directory or a directory of data files); None for what is not a local
    path (a hub dataset name)."""
    if os.path.isfile(path):
        return _file_digest(path)
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + _file_digest(full).encode())
    return h.hexdigest()


def ingredients(config: Config, tokenizer: Any) -> dict | None:
    """What a run's tokenised splits depend on (see the module docstring), or None when a source cannot
    be fingerprinted (a hub dataset)."""
    d, dpo = config.data, config.dpo
    files = {}
    for source in (*d.train, *d.eval):
        path = parse_source_spec(source).path
        digest = source_fingerprint(path)
        if digest is None:
            return None
        files[path] = digest
    return {
        "version": TOKENIZE_VERSION,
        "libraries": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "chat_template_kwargs": dict(d.chat_template_kwargs),
        "files": files,
        "data": {
            "train": list(d.train),
            "eval": list(d.eval),
            "eval_fraction": d.eval_fraction,
            "format": d.format,
            "max_length": d.max_length,
            "max_prompt_length": d.max_prompt_length,
            "skip_bad_rows": d.skip_bad_rows,
        },
        "seed": config.train.seed,
        "unpaired": dpo.unpaired,
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------
# An entry: arrays and manifest
# ------------------------------------------------------------------------------------------------


def _report_json(report: TokenizeReport) -> dict:
    out = dataclasses.asdict(report)
    out["dropped"] = dict(report.dropped)
    return out


def _report_from(saved: dict) -> TokenizeReport:
    report = TokenizeReport(**{**saved, "dropped": Counter(saved["dropped"])})
    for name in ("pair_length_percentiles", "sequence_length_percentiles"):  # JSON keys are text
        setattr(report, name, {int(k): v for k, v in getattr(report, name).items()})
    return report


def _pack(splits: TokenizedSplits) -> bytes:
    arrays = {}
    for split in _SPLITS:
        pairs = getattr(splits, split)
        if pairs is None:
            continue
        arrays[f"{split}_lengths"] = np.stack(pairs.lengths(), axis=1).astype(np.int64)
        for part in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = getattr(pairs, part)
            arrays[f"{split}_{part}"] = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
        arrays[f"{split}_source_index"] = np.asarray(pairs.source_index, np.int64)
        if pairs.labels is not None:
            arrays[f"{split}_labels"] = np.asarray(pairs.labels, bool)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack(raw: bytes, split: str) -> TokenizedPairs:
    with np.load(io.BytesIO(raw)) as z:
        lengths = z[f"{split}_lengths"]
        parts = []
        for col, part in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
            flat = z[f"{split}_{part}"]
            if len(flat) != int(lengths[:, col].sum()):
                raise ValueError(
                    f"{split} {part}: {len(flat)} ids for lengths summing to {lengths[:, col].sum()}"
                )
            parts.append(np.split(flat, np.cumsum(lengths[:-1, col])) if len(lengths) else [])
        labels = z[f"{split}_labels"] if f"{split}_labels" in z.files else None
        return TokenizedPairs(*parts, source_index=z[f"{split}_source_index"], labels=labels)


def save(directory, splits: TokenizedSplits, key: str, parts: dict, seconds: float, *, replace: bool) -> None:
    """Write `splits` as the entry at `directory` (the pairs' fingerprints in the manifest)."""
    manifest = {
        "key": key,
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ingredients": parts,
        "dropped": splits.dropped,
        "splits": {
            split: {
                "pairs": len(getattr(splits, split)),
                "fingerprint": getattr(splits, split).fingerprint(),
                "report": _report_json(getattr(splits, f"{split}_report")),
            }
            for split in _SPLITS
            if getattr(splits, split) is not None
        },
    }
    cache_entry.save_entry(directory, _pack(splits), manifest, replace=replace)


def load(directory, key: str) -> tuple[TokenizedSplits | None, str | None]:
    """The verified entry at `directory`: (splits, None); (None, why) when it is damaged or stale (a bad
    checksum, another key, arrays that do not give the manifest's pairs); (None, None) when there is none."""
    manifest, raw, problem = cache_entry.read_entry(directory)
    if raw is None:
        return None, problem
    if manifest.get("key") != key:
        return None, f"its manifest is of key {manifest.get('key')}, not {key}"
    try:
        got: dict[str, Any] = {"dropped": manifest["dropped"]}
        for split in _SPLITS:
            saved = manifest["splits"].get(split)
            if saved is None:
                got[split] = got[f"{split}_report"] = None
                continue
            pairs = _unpack(raw, split)
            if len(pairs) != saved["pairs"] or pairs.fingerprint() != saved["fingerprint"]:
                return None, f"its {split} arrays do not give the {saved['pairs']} pairs its manifest names"
            got[split], got[f"{split}_report"] = pairs, _report_from(saved["report"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    return TokenizedSplits(**got), None


def load_or_build(
    config: Config, tokenizer: Any, cache_dir, build: Callable[[], TokenizedSplits]
) -> tuple[TokenizedSplits, bool]:
    """The run's tokenised splits: the verified cache entry of its key, else `build()` them and store them
    (process 0; a damaged or stale entry is replaced). Returns (splits, reused). Without a key (a hub
    source) or with `data.token_cache: false`, `build()` alone."""
    parts = ingredients(config, tokenizer) if config.data.token_cache else None
    if parts is None:
        if config.data.token_cache:
            log.info("tokenised-data cache: off for this run (a source is not a local path: %s)",
                     ", ".join((*config.data.train, *config.data.eval)))  # fmt: skip
        return build(), False
    key = cache_key(parts)
    directory = as_path(cache_dir) / SUBDIR / key
    t0 = time.perf_counter()
    splits, problem = load(directory, key)
    if splits is not None:
        log.info("tokenised data: reused %s (%.2f s)", directory, time.perf_counter() - t0)
        return splits, True
    if problem:
        log.warning("tokenised-data cache %s is not usable: %s; tokenising again", directory, problem)
    t0 = time.perf_counter()
    splits = build()
    seconds = time.perf_counter() - t0
    if jax.process_index() == 0:
        save(directory, splits, key, parts, seconds, replace=problem is not None)
    log.info("tokenised data: %.1f s, saved to %s", seconds, directory)
    return splits, False
