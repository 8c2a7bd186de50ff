"""Content hashes of pytrees of arrays, computed where the shards live.

The reference cache keys its entries with the weights' hash; checkpoints record the hash of the state
they hold, so a resume can tell an intact checkpoint from one whose bytes changed on disk.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
