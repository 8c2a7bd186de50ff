"""Ring attention over the mesh's "context" axis (`model.context_attention: ring`).

Device i holds its rows' queries, keys and values of chunks i and 2C - 1 - i (the balanced layout,
`jdpo.parallel.context_layout`). In C steps each device attends its queries to the key / value shard it
holds, then passes that shard to device i + 1 (`ppermute`): after C steps every query has met every key
shard, and only two shards of k / v are resident at a time. The steps' partial results are merged by
their log-sum-exps (online softmax over shards, as the blocked kernel does over tiles within a shard).
A step visits only the key blocks of the visiting shard its query blocks can see (`attention._key_blocks`
with a key map): a shard wholly in a query's causal future, or holding none of its segment, costs only
its transfer.

The backward is a ring too (a `jax.custom_vjp`): the shards go round again with their gradients
dk / dv accumulating as they travel, the queries' dq at home; after C passes each dk / dv is back at
its owner. Probabilities are recomputed from the forward's final log-sum-exp (kept per query head and
token), so nothing of size [T, T] or per-step is saved.

Segment ids are gathered whole (int32 [B, T]): a query's visibility needs where its segment and its
shared prefix start, which may be on another device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdpo.models import attention
from jdpo.parallel import context_layout
from jdpo.parallel.sharding import CONTEXT_AXIS


def _kmap(qblk, src, C: int, blocks_per_row: int, chunk_blocks: int):
    """[nq, 2, 3] int32: for each query block, the global blocks (first, last, base) that the shard of
    device `src` holds of its row: chunks src and 2C - 1 - src, laid out chunk after chunk per row."""
    row = qblk // blocks_per_row
    starts = jnp.stack([src, 2 * C - 1 - src]) * chunk_blocks  # within the row
    first = row[:, None] * blocks_per_row + starts[None, :]
    base = row[:, None] * 2 * chunk_blocks + jnp.arange(2, dtype=jnp.int32)[None, :] * chunk_blocks
    return jnp.stack([first, first + chunk_blocks - 1, base], axis=-1).astype(jnp.int32)


def _pass(x, C: int):
    """Every device's x to device i + 1 (mod C)."""
    return jax.lax.ppermute(x, CONTEXT_AXIS, [(d, (d + 1) % C) for d in range(C)])


def _source(s, C: int):
    """Whose shard device i holds at ring step s."""
    return (jax.lax.axis_index(CONTEXT_AXIS) - s) % C


def _ring_forward(q, k, v, seg_k, seg_q, lo, ranges, C, scale, softcap, dims):
    """(out [nq, K, G, Cb, H] in q's dtype, lse [nq, K, G, Cb] float32) of the whole ring."""
    kmap = functools.partial(_kmap, ranges[:, 3], C=C, blocks_per_row=dims[0], chunk_blocks=dims[1])

    def step(s, carry):
        out, lse, k, v, seg_k = carry
        o_s, lse_s = attention._forward(
            q, k, v, (seg_q, seg_k), lo, ranges, scale, softcap, kmap(_source(s, C))
        )
        new = jnp.logaddexp(lse, lse_s)
        out = out * jnp.exp(lse - new)[..., None] + o_s.astype(jnp.float32) * jnp.exp(lse_s - new)[..., None]
        return out, new, _pass(k, C), _pass(v, C), _pass(seg_k, C)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], attention.NEG, jnp.float32), k, v, seg_k)
    out, lse, *_ = jax.lax.fori_loop(0, C, step, init)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ring(q, k, v, seg_k, seg_q, lo, ranges, C, scale, softcap, dims):
    return _ring_forward(q, k, v, seg_k, seg_q, lo, ranges, C, scale, softcap, dims)[0]


def _ring_fwd(q, k, v, seg_k, seg_q, lo, ranges, C, scale, softcap, dims):
    out, lse = _ring_forward(q, k, v, seg_k, seg_q, lo, ranges, C, scale, softcap, dims)
    return out, (q, k, v, seg_k, seg_q, lo, ranges, out, lse)


def _ring_bwd(C, scale, softcap, dims, res, d_out):
    q, k, v, seg_k, seg_q, lo, ranges, out, lse = res
    kmap = functools.partial(_kmap, ranges[:, 3], C=C, blocks_per_row=dims[0], chunk_blocks=dims[1])

    def step(s, carry):
        dq, k, v, seg_k, dk, dv = carry
        dq_s, dk_s, dv_s = attention._backward(
            q, k, v, (seg_q, seg_k), lo, ranges, out, lse, d_out, scale, softcap, kmap(_source(s, C))
        )
        # The shard moves on with its gradient; after C passes both are home.
        return dq + dq_s, _pass(k, C), _pass(v, C), _pass(seg_k, C), _pass(dk + dk_s, C), _pass(dv + dv_s, C)

    zeros = jnp.zeros(k.shape, jnp.float32)
    init = (jnp.zeros(q.shape, jnp.float32), k, v, seg_k, zeros, zeros)
    dq, _, _, _, dk, dv = jax.lax.fori_loop(0, C, step, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_local(q_BxTlxNxH, k_BxTlxKxH, v_BxTlxKxH, seg_BxTl, *window, C, scale, softcap, block):
    """One device inside a shard_map over "context": its balanced query shard [B, T / C, N, H] against
    the whole row, the k / v shards passed around the ring. Same result as `attention._local` over the
    gathered row."""
    B, Tl, N, H = q_BxTlxNxH.shape
    K, T = k_BxTlxKxH.shape[2], Tl * C
    seg_all = context_layout.gather_keys(seg_BxTl, C)  # the whole row's segment ids, natural order
    q, seg_q, lo, ranges = attention.query_layout(
        q_BxTlxNxH, seg_all, window[0] if window else None, block, context_layout.local_slots(Tl, C), K
    )
    k, v = attention.key_layout(k_BxTlxKxH, block), attention.key_layout(v_BxTlxKxH, block)
    dims = (T // block, Tl // 2 // block)  # blocks per row, blocks per chunk
    out = _ring(q, k, v, seg_BxTl.reshape(-1, block), seg_q, lo, ranges, C, scale, softcap, dims)
    return attention._unlayout(out, B, Tl)
