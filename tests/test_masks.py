"""`AttentionMask`, the one visibility rule of every attention path: its dense form against the masks the
model built before it existed (packed rows, sliding windows, the KV cache), per-layer windows (static and
traced), and the forms the blocked kernel refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpo.models import AttentionMask
from jdpo.models.attention import blocked_attention


def old_attention_masks(segment_ids_BxT, T, sliding_window):
    """The dense (full, sliding) masks [B, 1, T, T] of jdpo before `AttentionMask` (verbatim)."""
    q_idx = jnp.arange(T)[:, None]
    k_idx = jnp.arange(T)[None, :]
    causal_TxT = q_idx >= k_idx
    if segment_ids_BxT is None:
        full = causal_TxT[None, None]
    else:
        same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        full = (same_BxTxT & causal_TxT[None])[:, None]
    sliding = None if sliding_window is None else full & (q_idx - k_idx < sliding_window)[None, None]
    return full, sliding


def old_cache_masks(start_B, slot, T, S, sliding_window):
    """The dense (full, sliding) KV-cache masks [B, 1, T, S] `Transformer.extend` built inline (verbatim)."""
    q_slot_T = slot + jnp.arange(T, dtype=jnp.int32)
    k_slot_S = jnp.arange(S, dtype=jnp.int32)
    real_q_BxT = q_slot_T[None, :] >= start_B[:, None]
    real_k_BxS = k_slot_S[None, :] >= start_B[:, None]
    causal_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
    full = (causal_TxS[None] & (real_q_BxT[:, :, None] == real_k_BxS[:, None, :]))[:, None]
    in_window_TxS = q_slot_T[:, None] - k_slot_S[None, :] < sliding_window
    return full, full & in_window_TxS[None, None]


def random_segments(seed, B, T):
    """Packed rows: runs of ids 1, 2, ... then padding (0), and one id that resumes later in its row."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, s = 0, 1
        while t < T - 3:
            n = int(rng.integers(1, 8))
            seg[b, t : t + n] = s
            s, t = s + 1, t + n
    seg[0, -2:] = 1  # segment 1 again after others
    return jnp.asarray(seg)


def test_dense_is_causal_same_segment_within_window():
    """A hand-checked row: segments [1, 1, 2, 2, 2] then padding, window 2."""
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0]])
    want = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0],  # window 2: position 2 is too far back
            [0, 0, 0, 0, 0, 1, 0],  # padding sees padding (never a fully masked row)
            [0, 0, 0, 0, 0, 1, 1],
        ],
        bool,
    )
    got = AttentionMask(seg, window=2).dense()
    assert got.shape == (1, 1, 7, 7) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(got[0, 0], want)
    # Without the window position 4 sees all of its segment.
    np.testing.assert_array_equal(AttentionMask(seg).dense()[0, 0, 4], [0, 0, 1, 1, 1, 0, 0])
    # Not causal: the whole segment, later keys included (the flag is honoured by the dense form).
    np.testing.assert_array_equal(AttentionMask(seg, causal=False).dense()[0, 0, 2], [0, 0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("window", [None, 1, 3, 40])
def test_dense_equals_the_former_masks_of_packed_rows(window):
    B, T = 3, 24
    seg = random_segments(0, B, T)
    full, sliding = old_attention_masks(seg, T, window)
    mask = AttentionMask(seg, window=window)
    np.testing.assert_array_equal(mask.dense(), full if window is None else sliding)
    np.testing.assert_array_equal(mask.for_layer(False).dense(), full)
    # No segment ids (one sequence per row) was the plain causal mask; the model now passes ones.
    plain, plain_sliding = old_attention_masks(None, T, window)
    want = plain if window is None else plain_sliding
    np.testing.assert_array_equal(
        AttentionMask(jnp.ones((B, T), jnp.int32), window=window).dense(),
        jnp.broadcast_to(want, (B, 1, T, T)),
    )


def test_for_layer_static_and_traced():
    """gemma2 alternates local and global layers: a Python flag picks the window or drops it; a traced
    flag (layer scan) gives the same masks from one traced body, for the dense form and the kernel's."""
    B, T, window = 2, 16, 3
    seg = random_segments(1, B, T)
    full, sliding = old_attention_masks(seg, T, window)
    mask = AttentionMask(seg, window=window)
    assert mask.for_layer(True) is mask
    assert mask.for_layer(False).window is None
    no_window = AttentionMask(seg)
    assert no_window.for_layer(True) is no_window and no_window.for_layer(False) is no_window

    @jax.jit
    def per_layer(flags_L):
        return jax.lax.map(lambda f: mask.for_layer(f).dense(), flags_L)

    got = per_layer(jnp.asarray([True, False, True]))
    for layer, want in enumerate((sliding, full, sliding)):
        np.testing.assert_array_equal(got[layer], want)
    # The kernel reads the traced window: the same numbers as the static masks.
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, T, 2, 8)) for kk in ks)
    for flag, static in ((True, mask), (False, no_window)):
        traced = jax.jit(lambda f: blocked_attention(q, k, v, mask.for_layer(f), scale=0.3, block=4))(flag)
        np.testing.assert_allclose(traced, blocked_attention(q, k, v, static, scale=0.3, block=4), atol=1e-6)


@pytest.mark.parametrize("slot, T", [(0, 6), (6, 1), (9, 1)])
def test_kv_cache_form_equals_the_former_inline_mask(slot, T):
    """Prefill (T prompt slots at slot 0) and decode steps (one token at a later slot) of left-padded rows."""
    S, window = 10, 3
    start_B = jnp.asarray([0, 2, 5], jnp.int32)
    full, sliding = old_cache_masks(start_B, jnp.int32(slot), T, S, window)
    mask = AttentionMask.kv_cache(start_B, jnp.int32(slot), T, S, window=window)
    assert not mask.self_attention and mask.num_keys == S
    np.testing.assert_array_equal(mask.dense(), sliding)
    np.testing.assert_array_equal(mask.for_layer(False).dense(), full)
    traced = jax.jit(
        lambda f, s: AttentionMask.kv_cache(start_B, s, T, S, window=window).for_layer(f).dense()
    )
    np.testing.assert_array_equal(traced(jnp.bool_(True), jnp.int32(slot)), sliding)
    np.testing.assert_array_equal(traced(jnp.bool_(False), jnp.int32(slot)), full)
    # What it means: a real query sees the real slots up to its own (never padding nor unwritten slots),
    # a padding query only padding.
    dense, s_S = np.asarray(mask.for_layer(False).dense()[:, 0]), np.arange(S)
    for b, start in enumerate(np.asarray(start_B)):
        for t in range(T):
            want = ((s_S >= start) == (slot + t >= start)) & (s_S <= slot + t)
            np.testing.assert_array_equal(dense[b, t], want)


def test_mask_is_a_pytree_with_a_static_causal_flag():
    seg = random_segments(2, 2, 8)
    mask = AttentionMask(seg, window=3, causal=False)
    leaves, treedef = jax.tree.flatten(mask)
    assert len(leaves) == 3  # segment ids, q_start, window (no key ids: self-attention)
    back = jax.jit(lambda m: m)(mask)
    assert back.causal is False and int(back.window) == 3
    np.testing.assert_array_equal(back.dense(), mask.dense())


def test_blocked_kernel_refuses_forms_it_cannot_honour():
    """Its block ranges assume causal self-attention: the KV-cache form and non-causal masks are errors,
    not silently wrong numbers."""
    q = k = v = jnp.zeros((1, 4, 1, 8))
    for mask in (
        AttentionMask.kv_cache(jnp.zeros((1,), jnp.int32), jnp.int32(0), 4, 4),
        AttentionMask(jnp.ones((1, 4), jnp.int32), causal=False),
    ):
        with pytest.raises(ValueError, match="causal self-attention"):
            blocked_attention(q, k, v, mask, scale=1.0)
