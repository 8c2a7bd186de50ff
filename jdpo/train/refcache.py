"""Reference log-probs: the one-time reference pass and its on-disk cache.

With `dpo.reference: cached` (the default) the initial weights run once over the train and eval pairs
(forward only, no gradient) before training starts; the per-pair chosen / rejected log-probs and
completion token counts are saved under `<cache_dir>/<key>/` and looked up by pair id during
training, so no reference model is resident while the policy trains.

The key is a SHA-256 over everything the numbers depend on: a fingerprint of the weights, the model
architecture (e.g. rope_theta changes the logits without changing a weight), the tokenizer, the
tokenised pairs (their ids, in order), the length / dtype settings and which pairs a row holds (row
length, packing, slots per row) and the attention kernel. Same key: the cache is reused (by a later run
or a resumed one); any change: a new key. An entry is verified before use (its checksum, its number of
pairs, the set of computed pairs against the pairs the batches hold, finite values) and recomputed and
replaced when it fails.

Layout of one cache entry (`jdpo.train.cache_entry`: locally written to a temporary directory and
renamed, so a half-written cache never looks complete):
    <cache_dir>/<key>/arrays.npz      chosen, rejected [N] float32, chosen_counts, rejected_counts [N]
                                      int32, computed [N] bool (0 values for pairs no batch held),
                                      indexed by pair id
    <cache_dir>/<key>/manifest.json   key, number of pairs, SHA-256 of arrays.npz, the key's
                                      ingredients (for humans), timing

The cache directory may be on an object store (gs://...): `cache_entry` writes the manifest last there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jdpo.parallel import distributed
from jdpo.paths import as_path
from jdpo.scoring.forward import PairLogps
from jdpo.train import cache_entry

log = logging.getLogger(__name__)

ARRAYS, MANIFEST = cache_entry.ARRAYS, cache_entry.MANIFEST
FORMAT_VERSION = 2  # 2: a `computed` mask instead of NaN for pairs no batch held; a checksum


# ------------------------------------------------------------------------------------------------
# The cache key
# ------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's full serialisation (fast tokenizers), else of its vocabulary, plus the
    special tokens and chat template (both change the token ids of the pairs)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def ingredients(weights: str, *, model_config: dict, tokenizer: Any, pairs: Any, settings: dict) -> dict:
    """What a split's reference log-probs depend on, as fingerprints (the arguments of `cache_key`):
    the weights (`jdpo.train.fingerprint.weights_fingerprint`, computed once by the caller for every
    split), the architecture (`ModelConfig.to_hf()`), the tokenizer, the tokenised pairs
    (`TokenizedPairs`) and the length / dtype settings."""
    return {
        "weights": weights,
        "model_config": model_config,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "pairs": pairs.fingerprint(),
        "settings": settings,
    }


def cache_key(*, weights: str, model_config: dict, tokenizer: str, pairs: str, settings: dict) -> str:
    """The cache key: SHA-256 over the fingerprints and settings (see the module docstring)."""
    blob = json.dumps(
        {
            "version": FORMAT_VERSION,
            "weights": weights,
            "model_config": model_config,
            "tokenizer": tokenizer,
            "pairs": pairs,
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------
# The cached entries
# ------------------------------------------------------------------------------------------------


def save_entry(
    directory: str | os.PathLike, logps: PairLogps, manifest: dict, *, replace: bool = False
) -> None:
    """Write one entry to `directory` (`cache_entry.save_entry`: never complete half-written; the manifest
    records the SHA-256 of arrays.npz; `replace` swaps out a damaged entry)."""
    buf = io.BytesIO()  # np.savez into memory: the same bytes on every backend (an entry is ~16 B a pair)
    logps.save(buf)
    cache_entry.save_entry(directory, buf.getvalue(), manifest, replace=replace)


def load_entry(directory: str | os.PathLike, num_pairs: int, expected: np.ndarray | None = None):
    """The verified entry at `directory`: (PairLogps, None), or (None, why it cannot be used) when it is
    damaged or stale: unreadable or truncated files, a checksum that does not match, another number of
    pairs, another set of computed pairs than `expected` ([N] bool, the pairs the batches hold), or a
    non-finite value of a computed pair. (None, None) when there is no entry."""
    _, raw, problem = cache_entry.read_entry(directory)
    if raw is None:
        return None, problem
    try:
        ref = PairLogps.load(io.BytesIO(raw))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    if len(ref) != num_pairs:
        return None, f"it holds {len(ref)} pairs, the split has {num_pairs}"
    if expected is not None and not np.array_equal(ref.computed, expected):
        return (
            None,
            f"it has {int(ref.computed.sum())} pairs computed, the batches hold {int(expected.sum())}",
        )
    values = np.stack([ref.chosen, ref.rejected])[:, ref.computed]
    if not np.isfinite(values).all():
        return None, "it holds non-finite log-probs"
    return ref, None


def load_or_compute(
    cache_dir: str | os.PathLike,
    key: str,
    num_pairs: int,
    compute: Callable[[], PairLogps],
    *,
    expected: np.ndarray | None = None,
    describe: dict | None = None,
) -> tuple[PairLogps, bool]:
    """The cached entry `<cache_dir>/<key>` if it exists and verifies (`load_entry`), else `compute()`
    it (the reference pass: `jdpo.scoring.forward.over_split` of the frozen weights) and save it (process 0),
    replacing a damaged or stale entry.

    Returns (ref_logps, reused). `describe` (the key's ingredients, JSON-able) goes in the manifest.
    """

    directory = as_path(cache_dir) / key
    ref, problem = load_entry(directory, num_pairs, expected)
    if problem:
        log.warning("reference cache %s is not usable: %s; recomputing it", directory, problem)
    # Joint decision: a process that cannot see the entry (cache dir not shared, or stale) would
    # compute while the others skip ahead, and the pass's collectives would hang.
    if not distributed.any_process(ref is None):
        return ref, True
    t0 = time.time()
    ref = compute()
    if jax.process_index() == 0:
        manifest = {
            "key": key,
            "num_pairs": num_pairs,
            "format_version": FORMAT_VERSION,
            "seconds": round(time.time() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ingredients": describe or {},
        }
        save_entry(directory, ref, manifest, replace=problem is not None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jdpo refcache {key}")
    return ref, False


def for_split(
    weights: str,
    pairs: Any,
    *,
    compute: Callable[[], PairLogps],
    cache_dir: str | os.PathLike,
    model_config: dict,
    tokenizer: Any,
    settings: dict,
    expected: np.ndarray | None = None,
) -> tuple[PairLogps, bool, str]:
    """Reference log-probs of one split (`pairs`, a TokenizedPairs) under the weights whose fingerprint
    is `weights`: the key from `ingredients`, then `load_or_compute` (`expected`: [N] bool, the pairs the batches hold).
    Returns (ref_logps, reused, key)."""
    parts = ingredients(
        weights, model_config=model_config, tokenizer=tokenizer, pairs=pairs, settings=settings
    )
    key = cache_key(**parts)
    ref, reused = load_or_compute(
        cache_dir, key, len(pairs), compute, expected=expected, describe={**parts, "num_pairs": len(pairs)}
    )
    log.info("reference log-probs (%s, %d pairs): %s %s", settings.get("split"), len(pairs),
             "reused" if reused else "computed", as_path(cache_dir) / key)  # fmt: skip
    return ref, reused, key
