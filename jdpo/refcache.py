"""Reference log-probs: the one-time reference pass and its on-disk cache.

With `dpo.reference: cached` (the default) the initial weights run once over the train and eval pairs
(forward only, no gradient) before training starts; the per-pair chosen / rejected log-probs and
completion token counts are saved under `<cache_dir>/<key>/` and looked up by pair id during
training, so no reference model is resident while the policy trains.

The key is a SHA-256 over everything the numbers depend on: a fingerprint of the weights, the model
architecture (e.g. rope_theta changes the logits without changing a weight), the tokenizer, the
tokenised pairs (their ids, in order) and the length / dtype settings. Same key: the cache is reused
(by a later run or a resumed one); any change: a new key, never a stale cache.

Layout of one cache entry (locally written to a temporary directory and renamed, so a half-written
cache never looks complete):
    <cache_dir>/<key>/arrays.npz      chosen_logps, rejected_logps [N] float32, chosen_counts,
                                      rejected_counts [N] int32, indexed by pair id
    <cache_dir>/<key>/manifest.json   key, number of pairs, the key's ingredients (for humans), timing

The cache directory may be on an object store (gs://...). There is no rename there (fsspec copies and
deletes, which a reader can see half-way), but each object is written whole or not at all, so the entry
is written in place with the manifest last: an entry counts only once its manifest exists, and then
arrays.npz is complete. Two processes writing the same key write identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdpo.forward import PairLogps
from jdpo.paths import as_path, is_local

log = logging.getLogger(__name__)

ARRAYS = "arrays.npz"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# The cache key
# ------------------------------------------------------------------------------------------------


@jax.jit
def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Two uint32 sums over the bit patterns of one array, each element weighted by its position.

    Wrapping integer addition is associative, so the result is the same on any mesh and in any
    reduction order, and it is computed where the shards live (no gather of a large model to one host).
    """
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32) if x.dtype != jnp.uint32 else x
    m = jnp.ones(x.shape, jnp.uint32)
    for d, prime in zip(
        range(x.ndim), (2654435761, 2246822519, 3266489917, 668265263, 374761393), strict=False
    ):
        m = m + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(prime)
    s1 = jnp.sum(u * m, dtype=jnp.uint32)
    s2 = jnp.sum((u ^ (u >> 13)) * (m * m + jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


def weights_fingerprint(params: Any) -> str:
    """Content hash of a pytree of arrays (an nnx.State of the model parameters): names, shapes,
    dtypes and a position-weighted checksum of every value."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        fp = np.asarray(jax.device_get(_leaf_fingerprint(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|{fp.tolist()}\n".encode())
    return h.hexdigest()


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


def ingredients(params: Any, *, model_config: dict, tokenizer: Any, pairs: Any, settings: dict) -> dict:
    """What a split's reference log-probs depend on, as fingerprints (the arguments of `cache_key`):
    the weights, the architecture (`ModelConfig.to_hf()`), the tokenizer, the tokenised pairs
    (`TokenizedPairs`) and the length / dtype settings."""
    return {
        "weights": weights_fingerprint(params),
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


def save_entry(directory: str | os.PathLike, logps: PairLogps, manifest: dict) -> None:
    """Write one entry to `directory` so that it never looks complete half-written: locally into a
    sibling temporary directory, then renamed; on an object store in place, the manifest last."""
    directory = as_path(directory)
    buf = io.BytesIO()  # np.savez into memory: the same bytes on every backend (an entry is ~16 B a pair)
    logps.save(buf)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    if not is_local(directory):
        if (directory / MANIFEST).exists():  # another process won the race with identical content
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ARRAYS).write_bytes(buf.getvalue())
        (directory / MANIFEST).write_text(text)  # the commit marker: written after the arrays
        return
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ARRAYS).write_bytes(buf.getvalue())
    (tmp / MANIFEST).write_text(text)
    if directory.exists():  # another process won the race with identical content
        shutil.rmtree(tmp)
        return
    tmp.rename(directory)


def load_entry(directory: str | os.PathLike) -> PairLogps:
    return PairLogps.load(io.BytesIO((as_path(directory) / ARRAYS).read_bytes()))


def load_or_compute(
    cache_dir: str | os.PathLike,
    key: str,
    num_pairs: int,
    compute: Callable[[], PairLogps],
    *,
    describe: dict | None = None,
) -> tuple[PairLogps, bool]:
    """The cached entry `<cache_dir>/<key>` if it exists, else `compute()` it (the reference pass:
    `jdpo.forward.over_split` of the frozen weights) and save it (process 0).

    Returns (ref_logps, reused). `describe` (the key's ingredients, JSON-able) goes in the manifest.
    """
    from jdpo import distributed

    directory = as_path(cache_dir) / key
    ref = load_entry(directory) if (directory / MANIFEST).exists() else None
    # Joint decision: a process that cannot see the entry (cache dir not shared, or stale) would
    # compute while the others skip ahead, and the pass's collectives would hang.
    if not distributed.any_process(ref is None or len(ref) != num_pairs):
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
        save_entry(directory, ref, manifest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jdpo refcache {key}")
    return ref, False


def for_split(
    params: Any,
    pairs: Any,
    *,
    compute: Callable[[], PairLogps],
    cache_dir: str | os.PathLike,
    model_config: dict,
    tokenizer: Any,
    settings: dict,
) -> tuple[PairLogps, bool, str]:
    """Reference log-probs of one split (`pairs`, a TokenizedPairs) under `params`: the key from
    `ingredients`, then `load_or_compute`. Returns (ref_logps, reused, key)."""
    parts = ingredients(
        params, model_config=model_config, tokenizer=tokenizer, pairs=pairs, settings=settings
    )
    key = cache_key(**parts)
    ref, reused = load_or_compute(
        cache_dir, key, len(pairs), compute, describe={**parts, "num_pairs": len(pairs)}
    )
    log.info("reference log-probs (%s, %d pairs): %s %s", settings.get("split"), len(pairs),
             "reused" if reused else "computed", as_path(cache_dir) / key)  # fmt: skip
    return ref, reused, key
