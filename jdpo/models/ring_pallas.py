"""Ring attention with a Pallas kernel as each step's kernel, `mesh.context` > 1: TPU Splash attention
(`model.attention: splash`) or jdpo's own Pallas GPU (Triton) flash kernel (`model.attention: pallas_gpu`,
`jdpo.models.flash_gpu`). `jdpo.models.ring` is the same ring with the blocked kernel.

Device i holds chunks i and 2C - 1 - i of its rows (the balanced layout, `jdpo.parallel.context_layout`),
each of L = T / 2C positions; at ring step s it holds the key / value shard of device (i - s) mod C,
chunks src and 2C - 1 - src. A step is four (query chunk a, key chunk b) pairs, each one kernel call of
L queries against L keys, and the only thing that differs between pairs is where chunk b lies from
chunk a: d = a - b chunks. Splash's mask is static (its tile structure is precomputed in numpy when the
kernel is built), and so is the flash kernel's query offset (its tile loop bounds are expressions of the
program id), but every d gives a fixed mask on the chunks' local positions:
  d < 0        the whole key chunk is in the queries' future: skipped (no kernel call);
  d = 0        the diagonal, `CausalMask`;
  d > 0        fully visible, `FullMask`;
  window w     local query t sees local key u when 0 <= dL + t - u < w: `LocalMask((w - 1, 0),
               offset=dL)` (only causal within it at d = 0; a chunk pair wholly beyond the window is
               skipped, one wholly within it is `FullMask`).
The flash kernel takes the same masks as (query offset, causal, window): (0, causal, none), (0, not
causal, none) and (dL, causal, w).
So the kernel is built once per distinct mask (at most 2C + 2 of them) and `lax.switch` picks one per
pair from the traced d: the same compiled kernels serve every device and step. Segments are data:
`SegmentIds(q=the query chunk's ids, kv=the key chunk's)`, which Splash compares for equality (the flash
kernel takes the two arrays as they are).

The shared prompt (`jdpo.models.masks`: a query of segment s > 0 also sees its prefix's keys, id
-(ceil(s / 2))) is a second call per pair with the queries' ids replaced by their prefix's id: the two
calls see disjoint keys (a negative id is never a query's own), so their results merge by log-sum-exp
like the ring's steps. It runs only when the key chunk holds a negative id.

Each call returns its partial output and float32 log-sum-exp per query head (`save_residuals`); the
results merge by log-sum-exp (online softmax over calls and steps). A query that sees no key of a call
gets Splash's masked-row junk (the mask value's log-sum-exp, or 0 / 0): it is replaced by output 0 and
log-sum-exp `attention.NEG`, so it weighs nothing in the merge (the flash kernel returns those itself).

The backward is the ring's (`jax.custom_vjp`): the shards go round again carrying dk / dv. Each pair's
gradients come from the kernel's own backward kernels (dq, dk / dv) given the whole attention's output and
log-sum-exp (the global softmax, restricted to the pair's keys, is exactly what they recompute). jax
exposes those kernels only through the custom VJP of the kernel it builds, which would use the pair's
own log-sum-exp, so they are called through `splash_attention_kernel._splash_attention_bwd` (jax 0.10,
pinned by pyproject: a change there fails tests/test_context_kernels.py, not silently).

Chunks are padded to the kernel's tile (Splash: a multiple of 128; flash: a power of two >= 16) with
ids no query or key shares.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdpo.models import attention, flash_gpu, splash
from jdpo.models.choices import RING_KERNELS
from jdpo.models.masks import prefix
from jdpo.parallel.sharding import CONTEXT_AXIS

_Q_PAD = np.iinfo(np.int32).min  # ids of padded query / key positions: equal to nothing else
_K_PAD = np.iinfo(np.int32).max
_SEEN = 0.5 * attention.NEG  # a log-sum-exp below this is Splash's masked-row value: nothing seen
KERNELS = RING_KERNELS


class _Static(NamedTuple):
    C: int
    L: int  # positions per chunk
    Lp: int  # padded to the tile
    tile: int
    heads: int
    window: int | None  # the model's static window (None: no layer has one within the row)
    softcap: float | None
    interpret: bool
    kernel: str = "splash"  # one of KERNELS
    bwd_tile: int = 0  # the flash kernel's backward tile (splash: its forward tile)


@functools.lru_cache(maxsize=64)
def _masks(st: _Static):
    """The distinct static masks, as keys (kind: causal, full or local; d), and two tables d -> branch
    (0: skip, i: masks[i - 1]) for d = 0..2C - 1: without the window and with it."""
    L, keys = st.L, []

    def branch(kind, d):
        if kind == "skip":
            return 0
        key = (kind, d if kind == "local" else 0)
        if key not in keys:
            keys.append(key)
        return 1 + keys.index(key)

    plain = [branch("causal" if d == 0 else "full", d) for d in range(2 * st.C)]
    windowed = plain
    if st.window is not None:
        windowed = []
        for d in range(2 * st.C):
            nearest, farthest = max(d * L - (L - 1), 0), d * L + L - 1  # q - k distances of the pair
            if nearest >= st.window:
                windowed.append(branch("skip", d))
            elif d > 0 and farthest < st.window:
                windowed.append(branch("full", d))
            else:
                windowed.append(branch("local", d))
    return keys, np.asarray(plain, np.int32), np.asarray(windowed, np.int32)


def _splash_mask(key, st: _Static):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    (kind, d), shape = key, (st.Lp, st.Lp)
    if kind == "causal":
        return sa.CausalMask(shape)
    if kind == "full":
        return sa.FullMask(shape)
    return sa.LocalMask(shape, (st.window - 1, 0), d * st.L)


def _kernels(st: _Static):
    """The Splash kernels of `_masks` (built per trace: they hold jax arrays, the masks' tile tables)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    t = st.tile
    sizes = sa.BlockSizes(
        block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t, block_kv_dkv=t, block_kv_dkv_compute=t,
        block_q_dq=t, block_kv_dq=t,
    )  # fmt: skip
    kernels = [
        sa.make_splash_mha(
            sa.MultiHeadMask([_splash_mask(key, st)] * st.heads),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            attn_logits_soft_cap=st.softcap,
            interpret=st.interpret,
            save_residuals=True,
        )  # fmt: skip
        for key in _masks(st)[0]
    ]
    return kernels


def _flash_kw(key, st: _Static, backward: bool = False):
    """The flash kernel's arguments for a mask of `_masks` (q is scaled before the ring)."""
    kind, d = key
    tile = st.bwd_tile if backward else st.tile
    kw = dict(softcap=st.softcap, scale=1.0, block_q=tile, block_k=tile, interpret=st.interpret)
    if kind == "causal":
        return dict(kw, offset=0, causal=True, window=None)
    if kind == "full":
        return dict(kw, offset=0, causal=False, window=None)
    return dict(kw, offset=d * st.L, causal=True, window=st.window)


def _fwd_calls(st: _Static):
    """One forward call per mask of `_masks`: (q, k, v, ids_q, ids_k) -> (out float32, lse)."""
    if st.kernel == "splash":
        return [_fwd_call(kern) for kern in _kernels(st)]

    def call(kw, q, k, v, ids_q, ids_k):
        out, lse = flash_gpu.forward(q, k, v, ids_q, ids_k, **kw)
        return out.astype(jnp.float32), lse

    return [functools.partial(call, _flash_kw(key, st)) for key in _masks(st)[0]]


def _bwd_calls(st: _Static):
    """One backward call per mask of `_masks`: (q, k, v, ids_q, ids_k, out, lse, d_out) -> (dq, dk, dv)
    float32, given the whole attention's out / lse."""
    if st.kernel == "splash":
        return [_bwd_call(kern) for kern in _kernels(st)]
    return [
        functools.partial(flash_gpu.backward, **_flash_kw(key, st, backward=True)) for key in _masks(st)[0]
    ]


def _collapse(info):
    """As jax's `_splash_attention` hands mask infos to its kernels: partial mask blocks flattened."""
    if info is None or info.partial_mask_blocks is None:
        return info
    blocks = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def _fwd_call(kernel):
    """One pair: q [B, N, Lp, H], k / v [B, K, Lp, H], ids [B, Lp] each -> (out [B, N, Lp, H] float32,
    lse [B, N, Lp])."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    def call(q, k, v, ids_q, ids_k):
        out, (lse,) = jax.vmap(lambda *a: kernel(*a[:3], SegmentIds(*a[3:])))(q, k, v, ids_q, ids_k)
        seen = lse > _SEEN
        return jnp.where(seen[..., None], out.astype(jnp.float32), 0.0), jnp.where(seen, lse, attention.NEG)

    return call


def _bwd_call(kernel):
    """One pair's share of the gradients given the whole attention's out / lse: (dq, dk, dv) float32."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kw = kernel.kwargs
    dq_info, dkv_info = _collapse(kernel.dq_mask_info), _collapse(kernel.dkv_mask_info)

    def one(q, k, v, ids_q, ids_k, out, lse, do):
        res = (q, k, v, SegmentIds(ids_q, ids_k), None, out, lse, dq_info, dkv_info)
        g = sk._splash_attention_bwd(
            False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
            kw["attn_logits_soft_cap"], kw["interpret"], res, do,
        )  # fmt: skip
        return tuple(x.astype(jnp.float32) for x in g[3:6])

    return jax.vmap(one)


def _pairs(q2, k2, ids_q2, ids_k2, a, b, windowed, st: _Static):
    """The (query chunk, key chunk, prefix?) calls of one ring step, as a traced loop index -> (branch,
    the call's operands). q2 [2, B, N, Lp, H], k2 [2, B, K, Lp, H], ids [2, B, Lp]; a, b [2] the global
    chunk indices of the queries' and the keys' chunks."""
    _, plain, windowed_table = _masks(st)
    tables = jnp.asarray(np.stack([plain, windowed_table]))

    def at(item):
        qc, kc, pre = item // 2 % 2, item % 2, item // 4
        d = a[qc] - b[kc]
        br = tables[windowed.astype(jnp.int32), jnp.clip(d, 0, 2 * st.C - 1)]
        ids_k = ids_k2[kc]
        ids_q = ids_q2[qc]
        ids_q = jnp.where(pre == 1, jnp.where(ids_q > 0, prefix(ids_q), _Q_PAD), ids_q)
        skip = (d < 0) | ((pre == 1) & ~jnp.any(ids_k < 0))
        return qc, kc, jnp.where(skip, 0, br), ids_q, ids_k

    return at


def _chunk_ids(st: _Static):
    i = jax.lax.axis_index(CONTEXT_AXIS).astype(jnp.int32)
    return jnp.stack([i, 2 * st.C - 1 - i])


def _shard_ids(i, st: _Static):
    return jnp.stack([i, 2 * st.C - 1 - i])


def _pass(x, C):
    return jax.lax.ppermute(x, CONTEXT_AXIS, [(d, (d + 1) % C) for d in range(C)])


def _forward(q2, k2, v2, ids_q2, ids_k2, windowed, st: _Static):
    calls = [lambda *a: (jnp.zeros(q2.shape[1:], jnp.float32), jnp.full(q2.shape[1:-1], attention.NEG))]
    calls += _fwd_calls(st)
    a, me = _chunk_ids(st), jax.lax.axis_index(CONTEXT_AXIS).astype(jnp.int32)

    def step(s, carry):
        out, lse, k2, v2, ids_k2 = carry
        at = _pairs(q2, k2, ids_q2, ids_k2, a, _shard_ids((me - s) % st.C, st), windowed, st)

        def item(n, carry):
            out, lse = carry
            qc, kc, br, ids_q, ids_k = at(n)
            o_n, lse_n = jax.lax.switch(br, calls, q2[qc], k2[kc], v2[kc], ids_q, ids_k)
            new = jnp.logaddexp(lse[qc], lse_n)
            o = out[qc] * jnp.exp(lse[qc] - new)[..., None] + o_n * jnp.exp(lse_n - new)[..., None]
            return out.at[qc].set(o), lse.at[qc].set(new)

        out, lse = jax.lax.fori_loop(0, 8, item, (out, lse))
        return out, lse, _pass(k2, st.C), _pass(v2, st.C), _pass(ids_k2, st.C)

    init = (jnp.zeros(q2.shape, jnp.float32), jnp.full(q2.shape[:-1], attention.NEG, jnp.float32))
    out, lse, *_ = jax.lax.fori_loop(0, st.C, step, (*init, k2, v2, ids_k2))
    return out.astype(q2.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring(q2, k2, v2, ids_q2, ids_k2, windowed, st):
    return _forward(q2, k2, v2, ids_q2, ids_k2, windowed, st)[0]


def _ring_fwd(q2, k2, v2, ids_q2, ids_k2, windowed, st):
    out, lse = _forward(q2, k2, v2, ids_q2, ids_k2, windowed, st)
    return out, (q2, k2, v2, ids_q2, ids_k2, windowed, out, lse)


def _ring_bwd(st, res, d_out):
    q2, k2, v2, ids_q2, ids_k2, windowed, out, lse = res
    zeros = (jnp.zeros(q2.shape[1:], jnp.float32), *(jnp.zeros(k2.shape[1:], jnp.float32),) * 2)
    calls = [lambda *a: zeros] + _bwd_calls(st)
    a, me = _chunk_ids(st), jax.lax.axis_index(CONTEXT_AXIS).astype(jnp.int32)
    d_out = d_out.astype(q2.dtype)

    def step(s, carry):
        dq, k2, v2, ids_k2, dk, dv = carry
        at = _pairs(q2, k2, ids_q2, ids_k2, a, _shard_ids((me - s) % st.C, st), windowed, st)

        def item(n, carry):
            dq, dk, dv = carry
            qc, kc, br, ids_q, ids_k = at(n)
            g = jax.lax.switch(br, calls, q2[qc], k2[kc], v2[kc], ids_q, ids_k, out[qc], lse[qc], d_out[qc])
            return dq.at[qc].add(g[0]), dk.at[kc].add(g[1]), dv.at[kc].add(g[2])

        dq, dk, dv = jax.lax.fori_loop(0, 8, item, (dq, dk, dv))
        # The shard moves on with its gradient; after C passes both are home.
        return dq, _pass(k2, st.C), _pass(v2, st.C), _pass(ids_k2, st.C), _pass(dk, st.C), _pass(dv, st.C)

    kz = jnp.zeros(k2.shape, jnp.float32)
    init = (jnp.zeros(q2.shape, jnp.float32), k2, v2, ids_k2, kz, kz)
    dq, _, _, _, dk, dv = jax.lax.fori_loop(0, st.C, step, init)
    return dq.astype(q2.dtype), dk.astype(k2.dtype), dv.astype(v2.dtype), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _chunks(x_BxTlxNxH, Lp):
    """[B, 2L, N, H] -> [2, B, N, Lp, H] (the device's two chunks, heads first, padded)."""
    B, Tl, N, H = x_BxTlxNxH.shape
    x = x_BxTlxNxH.reshape(B, 2, Tl // 2, N, H).transpose(1, 0, 3, 2, 4)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, Lp - Tl // 2), (0, 0)))


def _id_chunks(ids_BxTl, Lp, fill):
    B, Tl = ids_BxTl.shape
    x = ids_BxTl.reshape(B, 2, Tl // 2).transpose(1, 0, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, Lp - Tl // 2)), constant_values=fill)


def ring_pallas_local(q_BxTlxNxH, k_BxTlxKxH, v_BxTlxKxH, seg_BxTl, *window, C, scale, softcap, block,
                      sliding_window=None, interpret=None, kernel="splash"):  # fmt: skip
    """One device inside a shard_map over "context": its balanced query shard [B, T / C, N, H] against
    the whole row through `kernel` (splash or pallas_gpu), the k / v shards passed around the ring (module
    docstring). `window`: the mask's window (an int or a traced int32 scalar, a layer scan's: the model's
    static `sliding_window` on the layers where it equals it, none on the others). `block`: the kernel's
    tile at most (pallas_gpu: a power of two). `interpret`: Pallas' interpreter, None: off on the
    kernel's own backend (TPU for splash, GPU for pallas_gpu)."""
    if kernel not in KERNELS:
        raise ValueError(f"the Pallas ring runs {KERNELS}, not {kernel!r}")
    B, Tl, N, H = q_BxTlxNxH.shape
    T, L = Tl * C, Tl // 2
    if interpret is None:
        interpret = jax.default_backend() != ("tpu" if kernel == "splash" else "gpu")
    static_window = None
    windowed = jnp.asarray(False)
    if window:
        w = window[0]
        if isinstance(w, int | np.integer):
            static_window, windowed = int(w), jnp.asarray(True)
        else:
            if sliding_window is None:
                raise ValueError("ring splash: a traced window needs the static sliding_window it stands for")
            static_window, windowed = int(sliding_window), jnp.asarray(w, jnp.int32) == int(sliding_window)
    if static_window is not None and static_window >= T:  # no key of a row is that far back
        static_window, windowed = None, jnp.asarray(False)
    if kernel == "splash":
        tile = bwd_tile = splash.tile_for(L, block)
    else:  # a power of two >= 16 (Triton's dot), no larger than the chunk needs
        tile = max(flash_gpu.MIN_TILE, min(block, 1 << (L - 1).bit_length()))
        bwd_tile = min(tile, flash_gpu.BACKWARD_BLOCK)
    Lp = -(-L // tile) * tile
    st = _Static(C, L, Lp, tile, N, static_window, softcap, bool(interpret), kernel, bwd_tile)
    dtype = q_BxTlxNxH.dtype
    q = (q_BxTlxNxH.astype(jnp.float32) * scale).astype(dtype)
    q2, k2, v2 = _chunks(q, Lp), _chunks(k_BxTlxKxH, Lp), _chunks(v_BxTlxKxH, Lp)
    ids_q2, ids_k2 = _id_chunks(seg_BxTl, Lp, _Q_PAD), _id_chunks(seg_BxTl, Lp, _K_PAD)
    out2 = _ring(q2, k2, v2, ids_q2, ids_k2, windowed, st)  # [2, B, N, Lp, H]
    return out2[:, :, :, :L].transpose(1, 0, 3, 2, 4).reshape(B, Tl, N, H)
