"""Which keys a query may see: one `AttentionMask` object that every attention path reads.

A batch row may hold several sequences (packing); each position carries a segment id (0 = padding) and
a query sees only keys of its own segment, at or before it (causal), and on sliding layers only the last
`window` of them. Training and scoring attend over the row itself (S == T keys); generation attends T new
tokens over the S slots of a KV cache, where a slot is "real" once it holds a token of its row. Both are
the same rule over query and key segment ids and positions, so they are one object:

  key s is visible from query t  <=>  kv_segment_ids[s] in (segment_ids[t], prefix(segment_ids[t]))
                                      and s <= q_start + t             (causal)
                                      and q_start + t - s < window     (sliding layers)

with query t at key position q_start + t (q_start = 0 without a cache, the first written slot with one).

A negative segment id is a shared prefix: segment -(k + 1) is seen, besides by itself, by segments 2k + 1
and 2k + 2 (`prefix`). That is the shared-prompt layout of a preference pair (`jdpo.data.batching`): the
prompt once in segment -(k + 1), the chosen and rejected branches of slot k in 2k + 1 and 2k + 2 after
it, each seeing the prompt and itself but not the other branch. Without negative ids (one sequence per
segment, the KV cache's 0 / 1) the second term never matches: it is the plain packed rule. The window
counts row slots, which are positions only within a segment, so a prefix layout is never given to a
sliding-window model (`jdpo.models.kernels.shares_prompt`).

How each path reads it: the dense paths (jax.nn.dot_product_attention with "xla", the soft-capped
einsum, the KV cache) materialise the boolean [B, 1, T, S] mask with `dense()` inside the attention
call; the segment-aware kernels read `segment_ids_BxT` and `window` and never build a [T, S] mask: the
blocked kernel (`jdpo.models.attention`) derives its key-block ranges from them, splash
(`jdpo.models.splash`) and pallas_gpu (`jdpo.models.pallas_gpu`) take the segment ids as data.
gemma2's alternating local and global layers take `for_layer(is_sliding)`, which also works with a
traced flag (one scanned layer body for both kinds).

Padding queries (segment 0) are finite junk in every path, never a fully masked (NaN) row: the dense form
lets them see earlier padding (equal ids), the blocked kernel only themselves. The loss masks them out,
and a real token never sees padding (its id differs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp


def prefix(segment_ids):
    """The shared-prefix segment each segment also sees: -(k + 1) for 2k + 1 and 2k + 2; a segment <= 0
    (padding, a prefix itself) gets its own id, which adds nothing to what it sees."""
    return jnp.where(segment_ids > 0, -((segment_ids + 1) // 2), segment_ids)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("segment_ids_BxT", "kv_segment_ids_BxS", "q_start", "window", "slots_BxT"),
    meta_fields=("causal",),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """The visibility rule of one attention call (see the module docstring); a pytree, so it can cross
    `jax.jit` and `lax.scan` boundaries.

    Fields:
      segment_ids_BxT: int32 segment id of each query, 0 = padding.
      kv_segment_ids_BxS: int32 segment id of each key; None: the keys are the queries (S == T).
      q_start: key position of the first query (an int or a traced int32 scalar; 0 without a cache).
      window: sliding window (a key is visible when query position - key position < window): None for
        none, an int, or a traced int32 scalar (under a layer scan, see `for_layer`).
      causal: keys after the query are hidden (static; every jdpo model is causal).
      slots_BxT: int32 natural row slot of each position when the row reaches the model dealt over the
        mesh's context axis in blocks (`jdpo.data.context_balance`; only the context attention reads
        it, `jdpo.models.context_attention`); None: positions are in row order.
    """

    segment_ids_BxT: jax.Array
    kv_segment_ids_BxS: jax.Array | None = None
    q_start: Any = 0
    window: Any = None
    causal: bool = True
    slots_BxT: Any = None

    @classmethod
    def kv_cache(cls, start_B, slot, T: int, S: int, window: int | None = None) -> AttentionMask:
        """T queries at cache slots [slot, slot + T) over all S slots of a left-padded KV cache.

        Row b's real tokens occupy slots >= start_B[b]: real slots are segment 1, the padding before them
        segment 0, so padding is never attended and a padding query sees only padding (never NaN). Slots
        after the queries (unwritten yet) are hidden by causality. Slot distance is position distance
        for real tokens, so the window applies to slots as is.

        Args: start_B int32 [B]; slot int32 scalar (may be traced); T, S: static query / cache lengths.
        """
        q_slot_T = slot + jnp.arange(T, dtype=jnp.int32)
        real_q_BxT = (q_slot_T[None, :] >= start_B[:, None]).astype(jnp.int32)
        real_k_BxS = (jnp.arange(S, dtype=jnp.int32)[None, :] >= start_B[:, None]).astype(jnp.int32)
        return cls(real_q_BxT, real_k_BxS, q_start=slot, window=window)

    @property
    def self_attention(self) -> bool:
        """True when the keys are the queries themselves (no KV cache): the form the blocked kernel takes."""
        return self.kv_segment_ids_BxS is None

    @property
    def num_keys(self) -> int:
        """S, the number of key positions."""
        kv_BxS = self.segment_ids_BxT if self.kv_segment_ids_BxS is None else self.kv_segment_ids_BxS
        return kv_BxS.shape[1]

    def dense(self) -> jax.Array:
        """The mask as a boolean array [B, 1, T, S] (the head axis broadcasts), for dense attention."""
        kv_BxS = self.segment_ids_BxT if self.kv_segment_ids_BxS is None else self.kv_segment_ids_BxS
        T, S = self.segment_ids_BxT.shape[1], kv_BxS.shape[1]
        q_pos_T = self.q_start + jnp.arange(T, dtype=jnp.int32)
        k_pos_S = jnp.arange(S, dtype=jnp.int32)
        q_BxTx1, kv_Bx1xS = self.segment_ids_BxT[:, :, None], kv_BxS[:, None, :]
        visible_BxTxS = (q_BxTx1 == kv_Bx1xS) | (prefix(q_BxTx1) == kv_Bx1xS)
        if self.causal:
            visible_BxTxS = visible_BxTxS & (k_pos_S[None, :] <= q_pos_T[:, None])[None]
        if self.window is not None:
            visible_BxTxS = visible_BxTxS & (q_pos_T[:, None] - k_pos_S[None, :] < self.window)[None]
        return visible_BxTxS[:, None]

    def for_layer(self, is_sliding) -> AttentionMask:
        """The mask of one layer: this one (with its window) on sliding layers, without the window on the
        others. `is_sliding` is a Python bool in a layer loop, or a traced bool under a layer scan; then
        the window itself becomes traced, S + 1 on full layers (no key is that far back: restricts nothing),
        so one compiled body serves both kinds of layer."""
        if self.window is None:
            return self
        if isinstance(is_sliding, bool):
            return self if is_sliding else dataclasses.replace(self, window=None)
        window = jnp.where(is_sliding, self.window, self.num_keys + 1).astype(jnp.int32)
        return dataclasses.replace(self, window=window)
