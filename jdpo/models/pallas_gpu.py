"""GPU flash attention over packed rows: the Pallas (Triton) kernel of
`jax.experimental.pallas.ops.gpu.attention.mha`, which reads segment ids, so no [B, 1, T, T] mask exists.

Why this kernel and not cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` in jax 0.10 takes
a dense mask or per-row lengths (`query_seq_lengths`, `key_value_seq_lengths`: one sequence per row,
right padding), not the segments of a packed row. cuDNN's packed (THD) layout is reachable only through
jax's private `jax._src.cudnn` module, which jdpo does not build on. The Pallas kernel is public,
differentiable (its own Triton backward kernels recompute the probabilities from a saved float32
log-sum-exp) and runs in Pallas' interpret mode on a CPU, which is how the tests check it.

How jdpo's rule maps onto it (`jdpo.models.masks.AttentionMask`):
  segment ids  the kernel's `segment_ids` [B, T] (equal ids see each other; padding, id 0, sees earlier
               padding: finite junk the loss masks out);
  causal       `causal=True`: each query tile loops over key tiles up to its diagonal. Unlike the blocked
               kernel and splash it does not skip key tiles of earlier segments: a packed row costs
               the causal half of T x T, not the in-segment pairs;
  heads        one kv head per query head: grouped-query k / v are repeated to N heads (the residuals
               the backward pass keeps are [B, T, N, H], counted by `jdpo plan`);
  tiles        forward block_q = block_k = `model.attention_block` (default 128), backward tiles 32
               (the kernel's defaults), at most the forward tile; T is padded to a multiple of the
               forward tile with padding (id 0), cut off after;
  not covered  logit soft-capping (gemma2) and sliding windows shorter than the row: the kernel has
               neither. `jdpo.models.kernels` refuses those models for pallas_gpu before the weights
               load, and `auto` picks the blocked kernel for them on a GPU.
The kernel runs per device on its rows and heads (`jdpo.models.attention.per_device`). Rows split over
`mesh.context` cannot run it (one segment-id array for queries and keys, causality from position 0 of
both): the context ring runs jdpo's own flash kernel for a chunk pair instead (`jdpo.models.flash_gpu`,
`jdpo.models.ring_pallas`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdpo.models.attention import per_device
from jdpo.models.masks import AttentionMask

DEFAULT_BLOCK = 128  # the kernel's default forward tile
BACKWARD_BLOCK = 32  # the kernel's default backward tiles


def _local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, scale, block, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    B, T, N, _ = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    if K != N:  # query head n reads kv head n // (N / K), as in every other path
        k_BxTxKxH, v_BxTxKxH = (jnp.repeat(x, N // K, axis=2) for x in (k_BxTxKxH, v_BxTxKxH))
    pad = -T % block
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (jnp.pad(x, widths) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
        segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)))
    bwd = min(BACKWARD_BLOCK, block)
    sizes = gpu_attention.BlockSizes(
        block_q=block, block_k=block, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
    )
    out = gpu_attention.mha(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
        sm_scale=scale, causal=True, block_sizes=sizes, interpret=interpret,
    )  # fmt: skip
    return out[:, :T]


def pallas_gpu_attention(
    q_BxTxNxH,
    k_BxTxKxH,
    v_BxTxKxH,
    mask: AttentionMask,
    *,
    scale: float,
    block: int = DEFAULT_BLOCK,
    sliding_window: int | None = None,
    interpret: bool | None = None,
):
    """Exact attention of packed rows through the Pallas GPU flash-attention kernel (module docstring).

    Args:
      q_BxTxNxH: queries; k_BxTxKxH, v_BxTxKxH: keys and values (K divides N: grouped-query).
      mask: the rows' causal self-attention mask (no KV cache). Its window, if any, must not restrict
        (>= T: no key of a row is that far back); `sliding_window` is the model's static window, read
        when `mask.window` is traced (a layer scan).
      scale: score scale. block: forward tile (a power of two: Triton's tiles are).
      interpret: run the Pallas interpreter; None: off on a GPU, on elsewhere.
    Returns [B, T, N, H] in the dtype of q.
    """
    if not (mask.self_attention and mask.causal):
        raise ValueError("pallas_gpu_attention takes causal self-attention masks (no KV cache)")
    if block < 1 or block & (block - 1):
        raise ValueError(f"pallas_gpu_attention: block must be a power of two, got {block}")
    T = q_BxTxNxH.shape[1]
    window = mask.window if isinstance(mask.window, int) or mask.window is None else sliding_window
    if mask.window is not None and (window is None or window < T):
        raise ValueError(
            f"pallas_gpu_attention has no sliding window: a window of {window} restricts rows of {T} "
            "positions; use attention 'blocked' (or 'auto')"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    fn = functools.partial(_local, scale=scale, block=block, interpret=interpret)
    return per_device(fn, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask.segment_ids_BxT)
