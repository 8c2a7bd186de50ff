"""Reference log-probs: the per-pair forward, the one-time reference pass, and its on-disk cache.

With `dpo.reference: cached` (the default) the initial weights run once over the train and eval pairs
(forward only, no gradient) before training starts; the per-pair chosen / rejected log-probs and
completion token counts are saved under `<cache_dir>/<key>/` and looked up by pair id during
training, so no reference model is resident while the policy trains.

The key is a SHA-256 over everything the numbers depend on: a fingerprint of the weights, the model
architecture (e.g. rope_theta changes the logits without changing a weight), the tokenizer, the
tokenised pairs (their ids, in order) and the length / dtype settings. Same key: the cache is reused
(by a later run or a resumed one); any change: a new key, never a stale cache.

Layout of one cache entry (written to a temporary directory and renamed, so a half-written cache never
looks complete):
    <cache_dir>/<key>/arrays.npz      chosen_logps, rejected_logps [N] float32, chosen_counts,
                                      rejected_counts [N] int32, indexed by pair id
    <cache_dir>/<key>/manifest.json   key, number of pairs, the key's ingredients (for humans), timing
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdpo import logprobs
from jdpo.sharding import batch_shards

log = logging.getLogger(__name__)

ARRAYS = "arrays.npz"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# The per-pair forward (shared by the reference pass, the train step and eval)
# ------------------------------------------------------------------------------------------------


def pair_logprobs(model: Any, batch: dict[str, jax.Array], *, chunk_size: int = 1024) -> dict[str, jax.Array]:
    """Summed completion log-probs and token counts of every pair slot of a packed batch.

    One forward over chosen and rejected together (they are segments of the same rows), float32
    log-probs computed from the final hidden states in chunks of positions (never a [B, T, V] float32
    tensor), of the completion tokens only: positions with `loss_mask` = 0 are not projected onto the
    vocabulary (`logprobs.token_logprobs_from_hidden`'s `mask_BxT`). Pair k of a row has its chosen
    sequence in segment 2k+1 and its rejected in 2k+2.

    Args:
      model: a `jdpo.models.Transformer` (inside jit: merged from graphdef + params).
      batch: `input_ids`, `positions`, `segment_ids`, `targets` [B, T] int32, `loss_mask` [B, T] float32,
        `pair_ids` [B, P] int32.
    Returns `chosen`, `rejected` [B, P] float32 summed log-probs and `chosen_counts`,
    `rejected_counts` [B, P] float32 completion token counts (0 in empty slots).
    """
    P = batch["pair_ids"].shape[1]
    hidden_BxTxD = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    logp_BxT = logprobs.token_logprobs_from_hidden(
        hidden_BxTxD,
        model.unembedding(),
        batch["targets"],
        mask_BxT=batch["loss_mask"],
        chunk_size=chunk_size,
        logit_soft_cap=model.config.final_logit_softcapping,
        # One group of rows per batch shard: each device sorts and chunks its own rows' scored positions.
        row_groups=batch_shards(batch["input_ids"].shape[0]),
    )
    logps_BxS, counts_BxS = logprobs.segment_logprobs(
        logp_BxT, batch["loss_mask"], batch["segment_ids"], 2 * P
    )
    return {
        "chosen": logps_BxS[:, 0::2],
        "rejected": logps_BxS[:, 1::2],
        "chosen_counts": counts_BxS[:, 0::2].astype(jnp.float32),
        "rejected_counts": counts_BxS[:, 1::2].astype(jnp.float32),
    }


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
# The cached arrays
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RefLogps:
    """Reference log-probs of one split, indexed by pair id: chosen / rejected [N] float32 (summed over
    the completion) and chosen_counts / rejected_counts [N] int32."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_counts: np.ndarray
    rejected_counts: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)

    def lookup(self, pair_ids_BxP: np.ndarray) -> dict[str, np.ndarray]:
        """`ref_chosen_logps`, `ref_rejected_logps` [B, P] float32 for a batch's pair ids (0 for -1)."""
        ids = np.asarray(pair_ids_BxP)
        safe = np.where(ids >= 0, ids, 0)
        valid = ids >= 0
        return {
            "ref_chosen_logps": np.where(valid, self.chosen[safe], 0.0).astype(np.float32),
            "ref_rejected_logps": np.where(valid, self.rejected[safe], 0.0).astype(np.float32),
        }

    def save(self, directory: Path, manifest: dict) -> None:
        """Atomically write this entry to `directory` (a sibling temporary directory, then rename)."""
        directory = Path(directory)
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / ARRAYS, **dataclasses.asdict(self))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if directory.exists():  # another process won the race with identical content
            shutil.rmtree(tmp)
            return
        tmp.rename(directory)

    @classmethod
    def load(cls, directory: Path) -> RefLogps:
        with np.load(Path(directory) / ARRAYS) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})


def compute(forward: Callable[[dict], dict], batches: Iterable[dict], num_pairs: int) -> RefLogps:
    """Run `forward` (a jitted `pair_logprobs` of the frozen weights) over `batches` (one pass over a
    split; host-side dicts with `pair_ids` [B, P]) and scatter the results by pair id.

    On a multi-host run every process passes its own rows; the results are gathered so that every
    process holds the whole split's arrays. Pairs the batches never hold (longer than a row, so never
    trained on either) get NaN log-probs: looking one up by mistake fails loudly as a NaN loss.
    """
    out = RefLogps(
        chosen=np.full(num_pairs, np.nan, np.float32),
        rejected=np.full(num_pairs, np.nan, np.float32),
        chosen_counts=np.zeros(num_pairs, np.int32),
        rejected_counts=np.zeros(num_pairs, np.int32),
    )
    pending = None
    for batch in batches:
        # Keep one batch in flight: dispatch the next forward before pulling the previous to the host.
        result = (batch["pair_ids"], forward(batch))
        if pending is not None:
            _scatter(out, *pending)
        pending = result
    if pending is not None:
        _scatter(out, *pending)
    return out


def _scatter(out: RefLogps, pair_ids_BxP, res: dict) -> None:
    from jax.experimental import multihost_utils

    ids = np.asarray(pair_ids_BxP)
    if jax.process_count() > 1:
        # Host-local pair ids are this host's rows; the forward's outputs are global arrays. Gathered,
        # both come back whole (rows in process order) on every process.
        ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
        res = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in res.items()}
    else:
        res = {k: np.asarray(jax.device_get(v)) for k, v in res.items()}
    if res["chosen"].shape[0] != ids.shape[0]:
        raise ValueError(
            f"forward returned {res['chosen'].shape[0]} rows for {ids.shape[0]} rows of pair ids"
        )
    valid = ids >= 0
    sel = ids[valid]
    out.chosen[sel] = res["chosen"][valid]
    out.rejected[sel] = res["rejected"][valid]
    out.chosen_counts[sel] = np.rint(res["chosen_counts"][valid]).astype(np.int32)
    out.rejected_counts[sel] = np.rint(res["rejected_counts"][valid]).astype(np.int32)


def load_or_compute(
    cache_dir: str | Path,
    key: str,
    num_pairs: int,
    make_batches: Callable[[], Iterable[dict]],
    forward: Callable[[dict], dict],
    *,
    describe: dict | None = None,
) -> tuple[RefLogps, bool]:
    """The cached entry `<cache_dir>/<key>` if it exists, else compute it and save it (process 0).

    Returns (ref_logps, reused). `describe` (the key's ingredients, JSON-able) goes in the manifest.
    """
    from jdpo import distributed

    directory = Path(cache_dir) / key
    ref = RefLogps.load(directory) if (directory / MANIFEST).exists() else None
    # Joint decision: a process that cannot see the entry (cache dir not shared, or stale) would
    # compute while the others skip ahead, and the pass's collectives would hang.
    if not distributed.any_process(ref is None or len(ref) != num_pairs):
        return ref, True
    t0 = time.time()
    ref = compute(forward, make_batches(), num_pairs)
    if jax.process_index() == 0:
        manifest = {
            "key": key,
            "num_pairs": num_pairs,
            "format_version": FORMAT_VERSION,
            "seconds": round(time.time() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ingredients": describe or {},
        }
        ref.save(directory, manifest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jdpo refcache {key}")
    return ref, False


def for_split(
    params: Any,
    pairs: Any,
    *,
    forward: Callable[[dict], dict],
    batches: Callable[[], Iterable[dict]],
    cache_dir: str | Path,
    model_config: dict,
    tokenizer: Any,
    settings: dict,
) -> tuple[RefLogps, bool, str]:
    """Reference log-probs of one split (`pairs`, a TokenizedPairs) under `params`: the key from
    `ingredients`, then `load_or_compute`. Returns (ref_logps, reused, key)."""
    parts = ingredients(
        params, model_config=model_config, tokenizer=tokenizer, pairs=pairs, settings=settings
    )
    key = cache_key(**parts)
    ref, reused = load_or_compute(
        cache_dir, key, len(pairs), batches, forward, describe={**parts, "num_pairs": len(pairs)}
    )
    log.info("reference log-probs (%s, %d pairs): %s %s", settings.get("split"), len(pairs),
             "reused" if reused else "computed", Path(cache_dir) / key)  # fmt: skip
    return ref, reused, key
