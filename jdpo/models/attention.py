"""Segment-aware block-sparse attention: exact attention over packed rows that skips key blocks no
query of a block can see.

Packed rows hold many short sequences (segments), and a query only sees keys of its own segment at or
before it (and within the sliding window on local layers). Dense masked attention pays for all T keys
of the row per query and materialises [B, N, T, T] float32 scores, probabilities and their gradients;
on hh-rlhf-shaped data a token sees ~100 of the 1024 keys of its row. This kernel cuts the rows into
blocks of `block` positions, visits for query block i only the key blocks j in [first_i, i], where
first_i is the block holding the earliest key any of its queries can see, and keeps a running
(flash-attention) softmax so nothing larger than a [N, block, block] tile exists. The backward pass is
written by hand (`jax.custom_vjp`) over the same blocks, recomputing the tiles from the saved
log-sum-exp. The block ranges are data-dependent loop bounds (`lax.fori_loop` with traced bounds),
which is why the backward cannot come from autodiff.

Visibility is the rule of `jdpo.models.masks.AttentionMask` (read from its segment ids and window), the
same as its dense form for every non-padding query: key t' is visible from query t of the same row when
segment_ids[t'] == segment_ids[t] != 0, t' <= t, and t - t' < window, or when segment_ids[t'] is the
query's shared prefix (`masks.prefix`: -(k + 1) for segments 2k + 1 and 2k + 2, the shared-prompt layout)
and t' <= t. Such a query block visits its prefix's key blocks first, then its own segment's, so a
rejected branch skips the chosen branch's blocks between them. A padding query (segment 0) sees only
itself: finite junk that the loss masks out.

All rows are laid end to end (rows never share a block: T is padded to a multiple of `block`), so the
block ranges are per row, not the union over the batch. Under a mesh the kernel runs per device on its
own rows and heads (`shard_map` over the batch and head axes of the rules table), so each device's
loop bounds come from its own rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdpo.models.masks import AttentionMask, prefix
from jdpo.parallel.sharding import current_mesh, logical_to_spec, spec_entry_size

# Positions per tile. On the 2-core CPU bench (B=4, T=1024, 8 heads of 64, segments ~160): attention
# fwd+bwd 64 ms at 32 and 64, 78 ms at 128, 113 ms at 256 (dense: 625 ms). Accelerators want larger
# tiles (model.attention_block).
DEFAULT_BLOCK = 64
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked score: exp() underflows to 0, no inf - inf


def _spans(ids_T):
    """Per position (ids in any order: a segment may resume later in the row), with one stable sort,
    O(T log T), never a [T, T] comparison: the first position holding its id, and the first and last
    positions holding its shared prefix's id (`masks.prefix`), -1 where it has none [T] int32 each."""
    T = ids_T.shape[0]
    t_T = jnp.arange(T, dtype=jnp.int32)
    order_T = jnp.argsort(ids_T, stable=True).astype(jnp.int32)
    sorted_T = ids_T[order_T]
    starts_T = jnp.concatenate([jnp.ones((1,), jnp.bool_), sorted_T[1:] != sorted_T[:-1]])
    # Each sorted slot's group start; a stable sort puts a group's smallest position first.
    group_start_T = jax.lax.cummax(jnp.where(starts_T, t_T, 0))
    first_T = jnp.zeros((T,), jnp.int32).at[order_T].set(order_T[group_start_T])
    want_T = prefix(ids_T)
    lo_T = jnp.searchsorted(sorted_T, want_T, side="left").astype(jnp.int32)
    hi_T = jnp.searchsorted(sorted_T, want_T, side="right").astype(jnp.int32) - 1
    found_T = (ids_T > 0) & (hi_T >= lo_T)
    pfirst_T = jnp.where(found_T, order_T[jnp.clip(lo_T, 0, T - 1)], -1)
    plast_T = jnp.where(found_T, order_T[jnp.clip(hi_T, 0, T - 1)], -1)
    return first_T, pfirst_T, plast_T


def _visibility(segment_ids_BxT, window):
    """lo [B, T]: the earliest position (within the row) a query may see of its own segment; keys in
    [lo, t] of the same segment are visible. The first position of the query's segment in its row,
    raised to t - window + 1; t itself for padding. And the span [pfirst, plast] [B, T] of its shared
    prefix (-1, -1 for none), every key of which it sees (all are before it)."""
    B, T = segment_ids_BxT.shape
    t_T = jnp.arange(T, dtype=jnp.int32)
    first_BxT, pfirst_BxT, plast_BxT = jax.vmap(_spans)(segment_ids_BxT)
    lo_BxT = jnp.where(segment_ids_BxT == 0, t_T, first_BxT)
    if window is not None:
        lo_BxT = jnp.maximum(lo_BxT, t_T - jnp.asarray(window, jnp.int32) + 1)
    return lo_BxT, pfirst_BxT, plast_BxT


def _layout(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxS, window, block, q_slots=None):
    """Pad the rows to a multiple of `block`, lay rows end to end and cut into blocks (heads first, so
    each tile product is a plain batched matmul): q [nq, K, G, C, H], k / v [nk, K, C, H]; per query
    position its segment id and lowest visible key of its own segment (global indices) [nq, C]; per key
    position its segment id [nk, C]; per query block its key blocks and where it is: `ranges` [nq, 4]
    int32 = (a0, a1, b0, qblk): the prefix blocks [a0, a1] (empty when a1 < a0), then [b0, qblk],
    disjoint (a1 < b0), qblk the global index of the query block's own block of positions.

    The queries are the keys themselves (T == S) when `q_slots` is None; else they are a shard of the
    row (context parallelism, `jdpo.models.context_attention`) at row slots `q_slots` ([T] or per row
    [B, T], traced), each run of `block` queries one block-aligned run of slots."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    pad = -S % block
    if pad:
        if q_slots is not None:
            raise ValueError(f"a query shard needs rows of a multiple of the block {block}, got {S}")
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = (jnp.pad(x, widths) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
        segment_ids_BxS = jnp.pad(segment_ids_BxS, ((0, 0), (0, pad)))
    Sp, C = S + pad, block
    if q_slots is None:
        q_slots = jnp.arange(Sp, dtype=jnp.int32)
    elif T % C:
        raise ValueError(f"a shard of {T} queries does not divide into blocks of {C}")
    q, seg_q, lo, ranges = query_layout(q_BxTxNxH, segment_ids_BxS, window, C, q_slots, K)
    k, v = key_layout(k_BxSxKxH, C), key_layout(v_BxSxKxH, C)
    return q, k, v, (seg_q, segment_ids_BxS.reshape(-1, C)), lo, ranges


def key_layout(k_BxSxKxH, C: int):
    """Keys or values [B, S, K, H] (S a multiple of C) -> blocks [B S / C, K, C, H], rows end to end."""
    B, S, K, H = k_BxSxKxH.shape
    return k_BxSxKxH.reshape(B * S // C, C, K, H).transpose(0, 2, 1, 3)


def query_layout(q_BxTxNxH, segment_ids_BxS, window, C: int, slot_T, K: int):
    """Queries [B, T, N, H] (K key heads) at row slots `slot_T` ([T], or per row [B, T]) of rows of S
    keys (segment ids [B, S], S a multiple of C) -> (q [nq, K, G, C, H], segment ids [nq, C], lo [nq, C],
    ranges [nq, 4]): see `_layout`."""
    B, T, N, H = q_BxTxNxH.shape
    Sp = segment_ids_BxS.shape[1]
    nq = B * T // C
    row_start_Bx1 = (jnp.arange(B, dtype=jnp.int32) * Sp)[:, None]
    slot_BxT = jnp.broadcast_to(slot_T, (B, T))
    lo_BxS, pfirst_BxS, plast_BxS = _visibility(segment_ids_BxS, window)
    lo_BxT, pfirst_BxT, plast_BxT = (
        jnp.take_along_axis(x, slot_BxT, axis=1) for x in (lo_BxS, pfirst_BxS, plast_BxS)
    )
    q = q_BxTxNxH.reshape(nq, C, K, N // K, H).transpose(0, 2, 3, 1, 4)
    qblk = ((row_start_Bx1 + slot_BxT).reshape(nq, C)[:, 0] // C).astype(jnp.int32)
    lo = (lo_BxT + row_start_Bx1).reshape(nq, C)
    b0 = jnp.min(lo, axis=1) // C
    has = (pfirst_BxT >= 0).reshape(nq, C)
    big = jnp.iinfo(jnp.int32).max
    a0 = jnp.min(jnp.where(has, (pfirst_BxT + row_start_Bx1).reshape(nq, C), big), axis=1) // C
    a1 = jnp.max(jnp.where(has, (plast_BxT + row_start_Bx1).reshape(nq, C), -1), axis=1) // C
    a1 = jnp.minimum(a1, b0 - 1)  # blocks from b0 on are the second range's
    a0 = jnp.where(jnp.any(has, axis=1), a0, b0)  # no prefix: [b0, b0 - 1], empty
    seg_q = jnp.take_along_axis(segment_ids_BxS, slot_BxT, axis=1).reshape(nq, C)
    return q, seg_q, lo, jnp.stack([a0, a1, b0, qblk], axis=1)


def _unlayout(x_nbxKxGxCxH, B, T):
    nb, K, G, C, H = x_nbxKxGxCxH.shape
    return x_nbxKxGxCxH.transpose(0, 3, 1, 2, 4).reshape(B, nb * C // B, K * G, H)[:, :T]


def _kv_unlayout(x_nbxKxCxH, B, T):
    nb, K, C, H = x_nbxKxCxH.shape
    return x_nbxKxCxH.transpose(0, 2, 1, 3).reshape(B, nb * C // B, K, H)[:, :T]


def _tile(q_i, k_j, seg_i, seg_j, lo_i, i, j, scale, softcap):
    """Scores [K, G, C, C] (float32, soft-capped) of the query block of positions i (its global block
    index) against key block j, the tanh for the soft-cap's derivative (or None) and the visibility mask
    [C, C]."""
    C = q_i.shape[-2]
    s = jnp.einsum("kgqh,ksh->kgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    tanh = None
    if softcap is not None:
        tanh = jnp.tanh(s / softcap)
        s = tanh * softcap
    qpos = i * C + jnp.arange(C, dtype=jnp.int32)
    kpos = j * C + jnp.arange(C, dtype=jnp.int32)
    own = (kpos[None, :] >= lo_i[:, None]) & (seg_i[:, None] == seg_j[None, :])
    shared = (seg_i > 0)[:, None] & (prefix(seg_i)[:, None] == seg_j[None, :])
    mask = (kpos[None, :] <= qpos[:, None]) & (own | shared)
    return s, tanh, mask


def _key_blocks(ranges_i, body, init, kmap_i=None):
    """`body(j, jl, carry)` over the key blocks of a query block: its prefix blocks, then [b0, its own];
    j is the block's global index, jl its index in the key arrays. `kmap_i` None: the key arrays hold
    every block (jl = j); else [n, 3] int32 rows (first, last, base): they hold only global blocks
    first..last, at base.. (a ring step's visiting shard, `jdpo.models.ring`), and only those run."""
    a0, a1, b0, own = ranges_i[0], ranges_i[1], ranges_i[2], ranges_i[3]
    carry = init
    for lo, hi in ((a0, a1), (b0, own)):
        if kmap_i is None:
            carry = jax.lax.fori_loop(lo, hi + 1, lambda j, c: body(j, j, c), carry)
            continue
        for first, last, base in kmap_i:
            shift = base - first
            step = lambda j, c, shift=shift: body(j, j + shift, c)  # noqa: E731
            carry = jax.lax.fori_loop(jnp.maximum(lo, first), jnp.minimum(hi, last) + 1, step, carry)
    return carry


def _forward(q, k, v, seg, lo, ranges, scale, softcap, kmap=None):
    """Blocked forward: out [nq, K, G, C, H] (q dtype) and log-sum-exp [nq, K, G, C] float32. `kmap`
    [nq, n, 3]: the key arrays hold some blocks only (`_key_blocks`); a query that sees none of them
    gets out 0 and log-sum-exp NEG (nothing to merge)."""
    nq, K, G, C, H = q.shape
    seg_q, seg_k = seg

    def query_block(i):
        q_i, seg_i, lo_i, gi = q[i], seg_q[i], lo[i], ranges[i, 3]

        def key_block(j, jl, carry):
            m, l, acc = carry
            s, _, mask = _tile(q_i, k[jl], seg_i, seg_k[jl], lo_i, gi, j, scale, softcap)
            s = jnp.where(mask, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("kgqs,ksh->kgqh", p.astype(v.dtype), v[jl], preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (
            jnp.full((K, G, C), NEG, jnp.float32),
            jnp.zeros((K, G, C), jnp.float32),
            jnp.zeros((K, G, C, H), jnp.float32),
        )
        m, l, acc = _key_blocks(ranges[i], key_block, init, None if kmap is None else kmap[i])
        # With every key block, every query sees at least itself (the diagonal block), so l > 0.
        seen = l > 0
        l = jnp.where(seen, l, 1.0)
        return (acc / l[..., None]).astype(q.dtype), jnp.where(seen, m + jnp.log(l), NEG)

    return jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))


def _backward(q, k, v, seg, lo, ranges, out, lse, d_out, scale, softcap, kmap=None):
    """Gradients of the blocked attention w.r.t. the laid-out q, k, v (float32); `out` and `lse` are the
    whole attention's (with `kmap`, the keys a ring step holds: their share of the gradients)."""
    nq, K, G, C, H = q.shape
    seg_q, seg_k = seg
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, K, G, C]

    def query_block(i, carry):
        dq, dk, dv = carry
        q_i, do_i, seg_i, lo_i, gi = q[i], d_out[i], seg_q[i], lo[i], ranges[i, 3]

        def key_block(j, jl, carry):
            dq_i, dk, dv = carry
            s, tanh, mask = _tile(q_i, k[jl], seg_i, seg_k[jl], lo_i, gi, j, scale, softcap)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
            dv = dv.at[jl].add(jnp.einsum("kgqs,kgqh->ksh", p.astype(do_i.dtype), do_i,
                                         preferred_element_type=jnp.float32))  # fmt: skip
            dp = jnp.einsum("kgqh,ksh->kgqs", do_i, v[jl], preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None])
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = (ds * scale).astype(q.dtype)
            dq_i = dq_i + jnp.einsum("kgqs,ksh->kgqh", ds, k[jl], preferred_element_type=jnp.float32)
            dk = dk.at[jl].add(jnp.einsum("kgqs,kgqh->ksh", ds, q_i, preferred_element_type=jnp.float32))
            return dq_i, dk, dv

        init = (jnp.zeros((K, G, C, H), jnp.float32), dk, dv)
        dq_i, dk, dv = _key_blocks(ranges[i], key_block, init, None if kmap is None else kmap[i])
        return dq.at[i].set(dq_i), dk, dv

    zeros = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    return jax.lax.fori_loop(0, nq, query_block, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked(q, k, v, seg, lo_ranges, scale, softcap, block):
    lo, ranges = lo_ranges
    out, _ = _forward(q, k, v, seg, lo, ranges, scale, softcap)
    return out


def _blocked_fwd(q, k, v, seg, lo_ranges, scale, softcap, block):
    lo, ranges = lo_ranges
    out, lse = _forward(q, k, v, seg, lo, ranges, scale, softcap)
    return out, (q, k, v, seg, lo_ranges, out, lse)


def _blocked_bwd(scale, softcap, block, res, d_out):
    q, k, v, seg, (lo, ranges), out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, lo, ranges, out, lse, d_out, scale, softcap)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), (None, None), (None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxS, window, *, scale, softcap, block, q_slots=None):
    """The kernel on one device's rows: the queries are the keys' positions (q_slots None) or those at
    row slots `q_slots` (a context shard, see `_layout`)."""
    B, T = q_BxTxNxH.shape[:2]
    q, k, v, seg, lo, ranges = _layout(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxS, window, block, q_slots
    )
    return _unlayout(_blocked(q, k, v, seg, (lo, ranges), scale, softcap, block), B, T)


def blocked_attention(
    q_BxTxNxH,
    k_BxTxKxH,
    v_BxTxKxH,
    mask: AttentionMask,
    *,
    scale: float,
    softcap: float | None = None,
    block: int = DEFAULT_BLOCK,
):
    """Exact attention of packed rows, visiting only the key blocks a query block can see.

    Args:
      q_BxTxNxH: queries; k_BxTxKxH, v_BxTxKxH: keys and values (K divides N: grouped-query).
      mask: the rows' causal self-attention mask (no KV cache); its segment ids (0 = padding) and sliding
        window (None, an int, or a traced int32 scalar under a layer scan) decide the block ranges.
      scale: score scale. softcap: tanh soft-cap of the scores (gemma2) or None.
      block: positions per tile (query and key blocks alike).
    Returns [B, T, N, H] in the dtype of q.
    """
    # The block ranges assume keys == queries and causality (key blocks [first_i, i] only).
    if not (mask.self_attention and mask.causal):
        raise ValueError("blocked_attention takes causal self-attention masks (no KV cache)")
    fn = functools.partial(_local, scale=scale, softcap=softcap, block=block)
    qkv = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask.segment_ids_BxT)
    if mask.window is None:
        return per_device(functools.partial(fn, window=None), *qkv)
    return per_device(fn, *qkv, jnp.asarray(mask.window, jnp.int32))


def per_device(fn, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *replicated):
    """`fn(q, k, v, segment_ids, *replicated)` -> [B, T, N, H], run per device on its own rows and heads
    under the current mesh (`shard_map`; directly without one). Rows split over the batch axes of the
    rules table (data x fsdp); heads over tensor when both N and K divide by it, so every local query
    head has its key head. `replicated` (e.g. a traced window) goes to every device whole. Every
    segment-aware kernel (blocked, splash, pallas_gpu) runs through here: per-row work is row-local."""
    args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *replicated)
    mesh = current_mesh()
    if mesh is None:
        return fn(*args)
    heads = logical_to_spec((None, None, "act_kv_heads", None), k_BxTxKxH.shape, mesh)[2]
    qspec = logical_to_spec(("batch", None, None, None), q_BxTxNxH.shape, mesh)
    if heads is not None and q_BxTxNxH.shape[2] % spec_entry_size(mesh, heads) == 0:
        qspec = jax.sharding.PartitionSpec(qspec[0], None, heads, None)
    else:
        heads = None
    kspec = jax.sharding.PartitionSpec(qspec[0], None, heads, None)
    sspec = jax.sharding.PartitionSpec(qspec[0], None)
    specs = (qspec, kspec, kspec, sspec) + (jax.sharding.PartitionSpec(),) * len(replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qspec, check_vma=False)(*args)
