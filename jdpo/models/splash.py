"""Splash attention (TPU): the Pallas kernel of `jax.experimental.pallas.ops.tpu.splash_attention` over
jdpo's packed rows.

Splash takes the rows' segment ids as data and a static mask (causal, or causal within a sliding
window) from which it precomputes, per (query tile, key tile), whether the tile is empty, full or
partial; it skips the tiles that mask empties and applies the segment ids inside the others. So on
packed rows it computes every causal tile (like pallas_gpu), where the blocked kernel also skips the
tiles of earlier segments (`jdpo.report.flops.computed_attention_keys` counts both). It keeps a running
(flash-attention) softmax in float32, soft-caps the scores itself (`attn_logits_soft_cap`, gemma2),
takes grouped-query heads (K divides N) and has its own backward kernels (dq, dk / dv) that recompute
the probabilities from a saved float32 log-sum-exp per query head.

How jdpo's rule maps onto it (`jdpo.models.masks.AttentionMask`: key t' visible from query t when
their segment ids are equal, t' <= t and t - t' < window):
  segment ids  `SegmentIds(q=ids, kv=ids)` of each row; padding (id 0) sees earlier padding, finite
               junk the loss masks out (never a fully masked row: a query always sees itself);
  causal       `CausalMask`; a window w is `LocalMask(window_size=(w - 1, 0))` (causal within it);
  scale        splash has none: q is multiplied by the scale first, so the soft-cap sees the scaled
               score, tanh(q.k * scale / cap) * cap, as in every other path;
  tiles        block_q = block_kv = `model.attention_block` (default 512), multiples of 128 (the TPU
               lane width, which the kernel requires), no larger than T rounded up to 128; T is padded
               to a multiple of the tile with padding (id 0), cut off after;
  traced window  under a layer scan gemma2's window is traced (`AttentionMask.for_layer`: the
               window on sliding layers, S + 1 on full ones). The mask must be static, so both kernels
               are built and `lax.cond` picks one per layer, on whether the traced window is the
               static `sliding_window` the config gives.
The kernel runs per device on its rows and heads (`jdpo.models.attention.per_device`: `shard_map`
over the batch and head axes of the rules table); each device builds the kernel for its local heads.

Off TPU the kernel runs in Pallas' interpret mode (the same kernel program, evaluated by XLA on the
host's backend): that is how the CPU tests check it against the blocked kernel and dense attention,
values and gradients. It is slow; `model.attention: auto` picks splash on TPU only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdpo.models.attention import per_device
from jdpo.models.masks import AttentionMask

DEFAULT_BLOCK = 512  # positions per tile; the kernel's own default is 128, MaxText's 512
LANES = 128  # the kernel's tiles are multiples of the TPU lane width


def tile_for(T: int, block: int) -> int:
    """The tile the kernel uses for rows of T positions: `block` rounded down to a multiple of 128 (at
    least 128), at most T rounded up to 128."""
    tile = max(LANES, block // LANES * LANES)
    return min(tile, -(-T // LANES) * LANES)


def _kernel(num_heads: int, T: int, window: int | None, softcap: float | None, tile: int, interpret: bool):
    """The splash kernel of one device's heads for rows of T (a multiple of `tile`) positions."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (T, T)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    sizes = sa.BlockSizes(
        block_q=tile, block_kv=tile, block_kv_compute=tile,
        block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
        block_q_dq=tile, block_kv_dq=tile,
    )  # fmt: skip
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * num_heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )


def _local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *traced_window, scale, softcap, window, tile,
           interpret):  # fmt: skip
    """One device's rows and heads: pad T, heads first, one splash call per row (vmap)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, N, _ = q_BxTxNxH.shape
    pad = -T % tile
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (jnp.pad(x, widths) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
        segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)))
    Tp = T + pad
    dtype = q_BxTxNxH.dtype
    q_BxNxTxH = (q_BxTxNxH.astype(jnp.float32) * scale).astype(dtype).transpose(0, 2, 1, 3)
    k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
    ids = SegmentIds(segment_ids_BxT, segment_ids_BxT)

    def run(w):
        kernel = _kernel(N, Tp, w, softcap, tile, interpret)
        return jax.vmap(kernel)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, ids)

    if traced_window:
        out_BxNxTxH = jax.lax.cond(traced_window[0] == window, lambda: run(window), lambda: run(None))
    else:
        out_BxNxTxH = run(window)
    return out_BxNxTxH.transpose(0, 2, 1, 3)[:, :T].astype(dtype)


def splash_attention(
    q_BxTxNxH,
    k_BxTxKxH,
    v_BxTxKxH,
    mask: AttentionMask,
    *,
    scale: float,
    softcap: float | None = None,
    block: int = DEFAULT_BLOCK,
    sliding_window: int | None = None,
    interpret: bool | None = None,
):
    """Exact attention of packed rows through TPU Splash attention (see the module docstring).

    Args:
      q_BxTxNxH: queries; k_BxTxKxH, v_BxTxKxH: keys and values (K divides N: grouped-query).
      mask: the rows' causal self-attention mask (no KV cache): segment ids and window.
      scale: score scale. softcap: tanh soft-cap of the scores (gemma2) or None.
      block: positions per tile (`tile_for`). sliding_window: the model's static window, needed when
        `mask.window` is traced (a layer scan); ignored otherwise.
      interpret: run the Pallas interpreter; None: off on TPU, on elsewhere.
    Returns [B, T, N, H] in the dtype of q.
    """
    if not (mask.self_attention and mask.causal):
        raise ValueError("splash_attention takes causal self-attention masks (no KV cache)")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    T = q_BxTxNxH.shape[1]
    w, traced = mask.window, ()
    if w is None or isinstance(w, int | np.integer):
        window = None if w is None else int(w)
    else:
        if sliding_window is None:
            raise ValueError(
                "splash_attention: a traced mask.window needs the static sliding_window it stands for"
            )
        window, traced = int(sliding_window), (jnp.asarray(w, jnp.int32),)
    if window is not None and window >= T:  # no key of a row is that far back: the window restricts nothing
        window, traced = None, ()
    fn = functools.partial(
        _local, scale=scale, softcap=softcap, window=window, tile=tile_for(T, block), interpret=interpret
    )
    return per_device(fn, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask.segment_ids_BxT, *traced)
