"""jdpo's own Pallas GPU (Triton-lowered) flash-attention kernel for one (query chunk, key chunk) pair,
the kernel of each context-ring step with `model.attention: pallas_gpu` (`jdpo.models.ring_pallas`).

jax's Pallas GPU kernel (`jax.experimental.pallas.ops.gpu.attention.mha`, what `jdpo.models.pallas_gpu`
runs on an unsplit row) reads one segment-id array for queries and keys and counts causality from
position 0 of both, so it cannot attend one chunk's queries to another chunk's keys. This one takes:

  q [B, N, Lq, H], k / v [B, K, Lk, H]  heads first; K divides N and query head n reads kv head
                                        n // (N / K) (no repeat: the query heads of one kv head are one
                                        [G * Lq] axis, a free reshape, and each program reads its
                                        kv head's k / v);
  ids_q [B, Lq], ids_k [B, Lk]          int32 segment ids, separate: query t sees key u only when
                                        ids_q[t] == ids_k[u] (the shared prefix is a second call with
                                        the queries' ids replaced by their prefix's, as the ring does);
  offset (static int >= 0)              query t is at key position offset + t: with `causal` it sees
                                        keys u <= offset + t, and with `window` w only those with
                                        offset + t - u < w;
  softcap, scale                        scores cap * tanh(scale * q.k / cap) (the cap optional).

The forward returns the output and the float32 log-sum-exp per query head and token; a query that sees
no key gets output 0 and log-sum-exp `attention.NEG` (never NaN), so a log-sum-exp merge weighs it as
nothing. The backward (`backward`) takes the output and the log-sum-exp of the WHOLE attention (a ring
merges many pairs), recomputes each probability as exp(s - lse) and returns this pair's dq, dk, dv
(float32): one kernel over query tiles for dq, one over key tiles for dk / dv (which loops over the
query heads of its kv head, so grouped-query gradients are summed in the kernel).

Each program visits only the key (query) tiles its tile can see: up to the causal diagonal, from the
window's start; the offset and the window are static, so the bounds are expressions of the program id.
Triton's constraints: tiles are powers of two >= 16 (`plgpu.dot` needs 16 per dimension); the head
dimension is zero-padded to one (zeros change no score and give zero output columns, cut off). Lengths
must be multiples of the tiles (the ring pads chunks with ids no query or key shares). `interpret=True`
runs Pallas' interpreter (how the tests check it on a CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jdpo.models import attention

MIN_TILE = 16  # Triton's dot: every dimension >= 16
BACKWARD_BLOCK = 32  # the backward kernels' tile in the ring (as jax's Pallas GPU kernel's default)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _plgpu():
    from jax.experimental.pallas import triton as plgpu

    return plgpu


def _scores(q, k, ids_q, ids_k, q_pos, k_pos, *, causal, window, softcap, scale):
    """(visible [bq, bk], s [bq, bk] float32 with masked entries at NEG) of one tile pair."""
    s = _plgpu().dot(q, k, trans_b=True).astype(jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    visible = ids_q[:, None] == ids_k[None, :]
    if causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
    return visible, jnp.where(visible, s, attention.NEG)


def _key_tiles(q_first, q_last, nk, *, bk, causal, window):
    """[lo, hi) of the key tiles a query tile at positions [q_first, q_last] may see."""
    hi = jnp.minimum(nk, lax.div(q_last, bk) + 1) if causal else nk
    lo = lax.div(jnp.maximum(q_first - window + 1, 0), bk) if window is not None else 0
    return lo, hi


def _query_tiles(k_first, k_last, nq, *, bq, offset, causal, window):
    """[lo, hi) of the query tiles (of one head) that may see a key tile at positions [k_first, k_last]."""
    lo = lax.div(jnp.maximum(k_first - offset, 0), bq) if causal else 0
    if window is None:
        return lo, nq
    # queries with offset + t < k_last + window; t < k_last + window - offset
    end = jnp.maximum(k_last + window - offset, 0)
    return lo, jnp.minimum(nq, lax.div(end + bq - 1, bq))


def _forward_kernel(q_ref, k_ref, v_ref, idq_ref, idk_ref, o_ref, lse_ref, *, bq, bk, nq, offset, **mask):
    i = pl.program_id(0)
    t0 = lax.rem(i, nq) * bq  # the tile's first query within its head
    q = q_ref[...]
    ids_q = idq_ref[...]
    q_pos = offset + t0 + jnp.arange(bq, dtype=jnp.int32)
    lo, hi = _key_tiles(offset + t0, offset + t0 + bq - 1, k_ref.shape[0] // bk, bk=bk,
                        causal=mask["causal"], window=mask["window"])  # fmt: skip

    def body(j, carry):
        acc, m, l = carry
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        visible, s = _scores(q, k, ids_q, idk_ref[ks], q_pos, k_pos, **mask)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        fix = jnp.exp(m - m_new)
        acc = acc * fix[:, None] + _plgpu().dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l * fix + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
        jnp.full((bq,), attention.NEG, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), attention.NEG)


def _dq_kernel(q_ref, k_ref, v_ref, idq_ref, idk_ref, do_ref, lse_ref, delta_ref, dq_ref, *, bq, bk, nq,
               offset, **mask):  # fmt: skip
    i = pl.program_id(0)
    t0 = lax.rem(i, nq) * bq
    q, do = q_ref[...], do_ref[...]
    ids_q, lse, delta = idq_ref[...], lse_ref[...], delta_ref[...]
    q_pos = offset + t0 + jnp.arange(bq, dtype=jnp.int32)
    lo, hi = _key_tiles(offset + t0, offset + t0 + bq - 1, k_ref.shape[0] // bk, bk=bk,
                        causal=mask["causal"], window=mask["window"])  # fmt: skip

    def body(j, dq):
        ks = pl.ds(j * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        visible, s = _scores(q, k, ids_q, idk_ref[ks], q_pos, k_pos, **mask)
        ds = _score_grad(visible, s, lse, delta, _plgpu().dot(do, v, trans_b=True), **mask)
        return dq + _plgpu().dot(ds.astype(k.dtype), k).astype(jnp.float32)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _score_grad(visible, s, lse, delta, dp, *, softcap, scale, **_):
    """d loss / d (q.k) of a tile pair: p (dp - delta), through the soft-cap's tanh, times the scale."""
    p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (dp.astype(jnp.float32) - delta[:, None])
    if softcap is not None:
        ds = ds * (1.0 - jnp.square(jnp.where(visible, s, 0.0) / softcap))  # masked s is NEG: no inf
    return ds * scale


def _dkv_kernel(q_ref, k_ref, v_ref, idq_ref, idk_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, bq, bk,
                nq, G, offset, **mask):  # fmt: skip
    j = pl.program_id(0)
    k, v, ids_k = k_ref[...], v_ref[...], idk_ref[...]
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
    lo, hi = _query_tiles(j * bk, j * bk + bk - 1, nq, bq=bq, offset=offset, causal=mask["causal"],
                          window=mask["window"])  # fmt: skip

    def head(g, carry):
        def body(i, carry):
            dk, dv = carry
            t0 = i * bq
            rows = pl.ds(g * nq * bq + t0, bq)  # query head g of this kv head, tile i
            q, do = q_ref[rows, :], do_ref[rows, :]
            q_pos = offset + t0 + jnp.arange(bq, dtype=jnp.int32)
            visible, s = _scores(q, k, idq_ref[pl.ds(t0, bq)], ids_k, q_pos, k_pos, **mask)
            p = jnp.where(visible, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
            dv = dv + _plgpu().dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
            ds = _score_grad(visible, s, lse_ref[rows], delta_ref[rows], _plgpu().dot(do, v, trans_b=True),
                             **mask)  # fmt: skip
            return dk + _plgpu().dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32), dv

        return lax.fori_loop(lo, hi, body, carry)

    zeros = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _check(q, k, block_q, block_k, offset):
    (_, N, Lq, _), (_, K, Lk, _) = q.shape, k.shape
    for name, b, n in (("block_q", block_q, Lq), ("block_k", block_k, Lk)):
        if b < MIN_TILE or b & (b - 1):
            raise ValueError(f"flash_gpu: {name} must be a power of two >= {MIN_TILE}, got {b}")
        if n % b:
            raise ValueError(f"flash_gpu: length {n} is not a multiple of {name}={b}")
    if N % K:
        raise ValueError(f"flash_gpu: {N} query heads over {K} kv heads")
    if offset < 0:
        raise ValueError(f"flash_gpu: the query offset must be >= 0, got {offset}")


def _query_tile_specs(block_q, Lk, Hp, nq):
    """(the query tile's BlockSpec, the in_specs of q, k, v, ids_q, ids_k) of a kernel over query tiles
    (grid: query tiles of every grouped head, batch, kv head): a tile of queries against whole keys."""
    tile = pl.BlockSpec((None, None, block_q, Hp), lambda i, b, h: (b, h, i, 0))
    whole = pl.BlockSpec((None, None, Lk, Hp), lambda i, b, h: (b, h, 0, 0))
    ids_q = pl.BlockSpec((None, block_q), lambda i, b, h: (b, lax.rem(i, nq)))
    return tile, [tile, whole, whole, ids_q, pl.BlockSpec((None, Lk), lambda i, b, h: (b, 0))]


def _padded(x, Hp):
    return x if x.shape[-1] == Hp else jnp.pad(x, ((0, 0),) * 3 + ((0, Hp - x.shape[-1]),))


def _grouped(x, K):
    """[B, N, L, Hp] -> [B, K, G * L, Hp]: the query heads of each kv head as one axis (a free reshape)."""
    B, N, L, Hp = x.shape
    return x.reshape(B, K, N // K * L, Hp)


def _params(interpret, warps=4):
    return None if interpret else _plgpu().CompilerParams(num_warps=warps, num_stages=2)


def forward(q, k, v, ids_q, ids_k, *, offset=0, causal=True, window=None, softcap=None, scale=1.0,
            block_q=64, block_k=64, interpret=False):  # fmt: skip
    """(out [B, N, Lq, H] in q's dtype, lse [B, N, Lq] float32) of one call (module docstring)."""
    _check(q, k, block_q, block_k, offset)
    (B, N, Lq, H), K, Lk = q.shape, k.shape[1], k.shape[2]
    G, Hp, nq = N // K, max(MIN_TILE, _pow2(H)), Lq // block_q
    qg = _grouped(_padded(q, Hp), K)
    kp, vp = _padded(k, Hp), _padded(v, Hp)
    kernel = functools.partial(
        _forward_kernel, bq=block_q, bk=block_k, nq=nq, offset=offset, causal=causal, window=window,
        softcap=softcap, scale=scale,
    )  # fmt: skip
    tile, inputs = _query_tile_specs(block_q, Lk, Hp, nq)
    out, lse = pl.pallas_call(
        kernel,
        grid=(G * nq, B, K),
        in_specs=inputs,
        out_specs=[tile, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(qg.shape, q.dtype),
            jax.ShapeDtypeStruct((B, K, G * Lq), jnp.float32),
        ],
        compiler_params=_params(interpret),
        interpret=interpret,
        name="jdpo_flash_forward",
    )(qg, kp, vp, ids_q.astype(jnp.int32), ids_k.astype(jnp.int32))
    return out.reshape(B, N, Lq, Hp)[..., :H], lse.reshape(B, N, Lq)


def backward(q, k, v, ids_q, ids_k, out, lse, d_out, *, offset=0, causal=True, window=None, softcap=None,
             scale=1.0, block_q=32, block_k=32, interpret=False):  # fmt: skip
    """(dq, dk, dv) float32 of one call given the WHOLE attention's out [B, N, Lq, H] and float32 lse
    [B, N, Lq] (a ring's merge of many calls, or this call's own) and d_out; the probabilities are
    recomputed as exp(s - lse), delta = sum(d_out * out) per query head and token."""
    _check(q, k, block_q, block_k, offset)
    (B, N, Lq, H), K, Lk = q.shape, k.shape[1], k.shape[2]
    G, Hp, nq, nk = N // K, max(MIN_TILE, _pow2(H)), Lq // block_q, Lk // block_k
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).reshape(B, K, G * Lq)
    lse_g = lse.astype(jnp.float32).reshape(B, K, G * Lq)
    qg, dog = _grouped(_padded(q, Hp), K), _grouped(_padded(d_out.astype(q.dtype), Hp), K)
    kp, vp = _padded(k, Hp), _padded(v, Hp)
    ids_q, ids_k = ids_q.astype(jnp.int32), ids_k.astype(jnp.int32)
    statics = dict(bq=block_q, bk=block_k, nq=nq, offset=offset, causal=causal, window=window,
                   softcap=softcap, scale=scale)  # fmt: skip

    q_tile, inputs = _query_tile_specs(block_q, Lk, Hp, nq)
    q_row = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **statics),
        grid=(G * nq, B, K),
        in_specs=[*inputs, q_tile, q_row, q_row],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qg.shape, jnp.float32),
        compiler_params=_params(interpret),
        interpret=interpret,
        name="jdpo_flash_dq",
    )(qg, kp, vp, ids_q, ids_k, dog, lse_g, delta)

    k_tile = pl.BlockSpec((None, None, block_k, Hp), lambda j, b, h: (b, h, j, 0))
    q_whole = pl.BlockSpec((None, None, G * Lq, Hp), lambda j, b, h: (b, h, 0, 0))
    row_whole = pl.BlockSpec((None, None, G * Lq), lambda j, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, G=G, **statics),
        grid=(nk, B, K),
        in_specs=[
            q_whole,
            k_tile,
            k_tile,
            pl.BlockSpec((None, Lq), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
            q_whole,
            row_whole,
            row_whole,
        ],  # fmt: skip
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, jnp.float32)] * 2,
        compiler_params=_params(interpret),
        interpret=interpret,
        name="jdpo_flash_dkv",
    )(qg, kp, vp, ids_q, ids_k, dog, lse_g, delta)
    return dq.reshape(B, N, Lq, Hp)[..., :H], dk[..., :H], dv[..., :H]


def _fwd_kw(statics):
    kw = dict(statics)
    del kw["bwd_block_q"], kw["bwd_block_k"]
    return kw


def _bwd_kw(statics):
    kw = dict(statics)
    kw["block_q"], kw["block_k"] = kw.pop("bwd_block_q"), kw.pop("bwd_block_k")
    return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, ids_q, ids_k, statics):
    return forward(q, k, v, ids_q, ids_k, **_fwd_kw(statics))[0]


def _attend_fwd(q, k, v, ids_q, ids_k, statics):
    out, lse = forward(q, k, v, ids_q, ids_k, **_fwd_kw(statics))
    return out, (q, k, v, ids_q, ids_k, out, lse)


def _attend_bwd(statics, res, d_out):
    q, k, v, ids_q, ids_k, out, lse = res
    dq, dk, dv = backward(q, k, v, ids_q, ids_k, out, lse, d_out, **_bwd_kw(statics))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def flash_attention(q, k, v, ids_q, ids_k, *, offset=0, causal=True, window=None, softcap=None, scale=1.0,
                    block_q=64, block_k=64, bwd_block_q=32, bwd_block_k=32, interpret=False):  # fmt: skip
    """One differentiable call (its own log-sum-exp in the backward): out [B, N, Lq, H] in q's dtype."""
    statics = dict(
        offset=offset, causal=causal, window=window, softcap=softcap, scale=scale, block_q=block_q,
        block_k=block_k, bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret,
    )  # fmt: skip
    return _attend(q, k, v, ids_q, ids_k, tuple(sorted(statics.items())))
