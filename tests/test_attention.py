"""The blocked (segment-aware, block-sparse) attention kernel against dense masked attention written
out here: values and gradients, grouped-query heads, soft-capping, sliding windows (static and traced),
padding, ragged T, non-contiguous segment ids, and which key blocks it visits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_hf_config
from helpers_attention import dense_reference, packed_segments, qkv, shared_prompt_segments

from jdpo.models import AttentionMask, ModelConfig, ModelOptions, Transformer
from jdpo.models.attention import _layout, blocked_attention

CASES = {
    "gqa": dict(B=2, T=64, N=4, K=2, H=8, block=16),
    "mha_ragged_T": dict(B=3, T=50, N=4, K=4, H=8, block=16),
    "softcap": dict(B=2, T=64, N=4, K=2, H=8, block=16, softcap=5.0),
    "window": dict(B=2, T=64, N=4, K=1, H=8, block=8, window=7),
    "block_larger_than_T": dict(B=1, T=40, N=2, K=2, H=4, block=64),
}


# block_larger_than_T is slow (13 s): mha_ragged_T pads T to the block as well.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "block_larger_than_T" else n for n in CASES]
)
def test_blocked_equals_dense_in_values_and_grads(name):
    c = dict(CASES[name])
    B, T, N, K, H, block = (c.pop(x) for x in ("B", "T", "N", "K", "H", "block"))
    q, k, v = qkv(B, T, N, K, H)
    seg = jnp.asarray(packed_segments(np.random.default_rng(1), B, T))
    kw = dict(scale=H**-0.5, **c)
    window = kw.pop("window", None)

    def blocked(q, k, v):
        return blocked_attention(q, k, v, AttentionMask(seg, window=window), block=block, **kw)

    def dense(q, k, v):
        return dense_reference(q, k, v, seg, window=window, **kw)

    np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), atol=2e-6)
    w = jax.random.normal(jax.random.key(9), (B, T, N, H))
    g_blocked = jax.grad(lambda *a: jnp.sum(blocked(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_dense = jax.grad(lambda *a: jnp.sum(dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_dense, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)


# slow (12 s, 16 s): the shared-prompt layout through the blocked kernel (block 8, more than one tile per
# segment) equals the plain layout in values and gradients in tests/test_shared_prompt.py.
@pytest.mark.slow
@pytest.mark.parametrize("block", [8, 16])
def test_shared_prompt_layout_equals_dense_in_values_and_grads(block):
    """Rows of pairs with their prompt once (segment -(k + 1)) and two branches after it: every branch
    sees its prompt and itself, never the other branch, in values and gradients; the dense mask of
    `AttentionMask` (what xla runs) agrees as well."""
    B, T, N, K, H = 3, 96, 4, 2, 8
    q, k, v = qkv(B, T, N, K, H, seed=5)
    seg = jnp.asarray(shared_prompt_segments(np.random.default_rng(2), B, T))
    assert (np.asarray(seg) < 0).any() and (np.asarray(seg) == 4).any()  # prompts, a second pair

    def blocked(q, k, v):
        return blocked_attention(q, k, v, AttentionMask(seg), scale=H**-0.5, block=block)

    def dense(q, k, v):
        return dense_reference(q, k, v, seg, scale=H**-0.5)

    def masked(q, k, v):  # the dense form of the mask, as the xla kernel takes it
        kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        return jax.nn.dot_product_attention(q, kk, vv, mask=AttentionMask(seg).dense(), scale=H**-0.5)

    real = np.asarray(seg) != 0
    want = np.asarray(dense(q, k, v))
    np.testing.assert_allclose(np.asarray(blocked(q, k, v))[real], want[real], atol=2e-6)
    np.testing.assert_allclose(np.asarray(masked(q, k, v))[real], want[real], atol=2e-6)
    w = jax.random.normal(jax.random.key(9), (B, T, N, H)) * jnp.asarray(real)[..., None, None]
    g_blocked = jax.grad(lambda *a: jnp.sum(blocked(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_dense = jax.grad(lambda *a: jnp.sum(dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_dense, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)


def test_rejected_branch_skips_the_chosen_branch_blocks():
    """One row of blocks of 8: a prompt of 16 (blocks 0-1), chosen 16 (2-3), rejected 16 (4-5). Chosen
    blocks see [0, i] in one range; rejected blocks visit the prompt blocks [0, 1], then [4, i]: 2 + 3
    key blocks, not the 5 and 6 a single range from the prompt would take."""
    T, block = 48, 8
    seg = np.zeros((1, T), np.int32)
    seg[0, :16], seg[0, 16:32], seg[0, 32:] = -1, 1, 2
    q, k, v = qkv(1, T, 2, 2, 4)
    *_, ranges = _layout(q, k, v, jnp.asarray(seg), None, block)
    a0, a1, b0, _ = np.asarray(ranges).T
    np.testing.assert_array_equal(b0, [0, 0, 2, 2, 4, 4])
    np.testing.assert_array_equal(a0[2:], [0, 0, 0, 0])  # the prompt blocks, for every branch block
    np.testing.assert_array_equal(a1[2:], [1, 1, 1, 1])
    assert (a1[:2] < a0[:2]).all()  # prompt blocks have no prefix of their own


def test_traced_window_and_non_contiguous_segments():
    """A window passed as a traced scalar (layer scans) and a segment id that reappears later in the row
    (the kernel's block ranges must still cover the earlier run)."""
    B, T, N, K, H = 2, 48, 2, 2, 8
    q, k, v = qkv(B, T, N, K, H, seed=3)
    seg = np.ones((B, T), np.int32)
    seg[0, 10:30] = 2  # segment 1 resumes at 30 and sees positions 0..9 again
    seg[1, 40:] = 0
    seg = jnp.asarray(seg)
    for window in (5, T + 1):
        got = jax.jit(
            lambda q, k, v, w: blocked_attention(q, k, v, AttentionMask(seg, window=w), scale=0.3, block=8)
        )(q, k, v, jnp.int32(window))
        np.testing.assert_allclose(got, dense_reference(q, k, v, seg, scale=0.3, window=window), atol=2e-6)


def test_padding_rows_are_finite_in_values_and_grads():
    B, T, N, K, H = 2, 32, 2, 1, 8
    q, k, v = qkv(B, T, N, K, H, seed=4)
    seg = jnp.asarray(np.stack([np.zeros(T, np.int32), packed_segments(np.random.default_rng(0), 1, T)[0]]))
    grads = jax.grad(
        lambda *a: jnp.sum(blocked_attention(*a, AttentionMask(seg), scale=0.3, block=8) ** 2),
        argnums=(0, 1, 2),
    )(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_bf16_inputs_match_float32_closely():
    B, T, N, K, H = 1, 64, 4, 2, 16
    q, k, v = qkv(B, T, N, K, H, seed=5)
    seg = jnp.asarray(packed_segments(np.random.default_rng(2), B, T))
    mask = AttentionMask(seg)
    ref = blocked_attention(q, k, v, mask, scale=0.25, block=16)
    low = blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, scale=0.25, block=16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=5e-2)


def test_only_visible_key_blocks_are_visited():
    """Two rows of 4 blocks of 8: row 0 holds segments of 8, 8 and 16 positions, row 1 one segment of 30
    and 2 of padding. Query block i visits key blocks [first_i, i]: row 0 needs 1 + 1 + 1 + 2 = 5 of
    the 10 causal block pairs, row 1 all 10 (its segment spans every block)."""
    T, block = 32, 8
    seg = np.zeros((2, T), np.int32)
    seg[0, :8], seg[0, 8:16], seg[0, 16:] = 1, 2, 3
    seg[1, :30] = 1
    q, k, v = qkv(2, T, 2, 2, 4)
    *_, ranges = _layout(q, k, v, jnp.asarray(seg), None, block)
    first = np.asarray(ranges)[:, 2]
    assert (np.asarray(ranges)[:, 1] < np.asarray(ranges)[:, 0]).all()  # no shared prefix: none visited
    i = np.arange(8)
    np.testing.assert_array_equal(first, [0, 1, 2, 2, 4, 4, 4, 4])
    assert (i - first + 1)[:4].sum() == 5 and (i - first + 1)[4:].sum() == 10
    # A sliding window of 4 cuts row 1 to the diagonal and the block before it.
    *_, ranges_w = _layout(q, k, v, jnp.asarray(seg), 4, block)
    np.testing.assert_array_equal(np.asarray(ranges_w)[4:, 2], [4, 4, 5, 6])


SIZES = dict(vocab_size=64, intermediate_size=48)  # on top of helpers.tiny_hf_config's sizes
HF_CONFIGS = {
    "llama": tiny_hf_config("llama", **SIZES),
    # A window of 5, the attention soft-cap only, SiLU.
    "gemma2": tiny_hf_config(
        "gemma2", sliding_window=5, final_logit_softcapping=None, hidden_activation="silu", **SIZES
    ),
}


@pytest.mark.parametrize(
    "family, scan_layers",
    # scanned llama is slow (11 s): scanned gemma2 runs the scan with both kinds of layer
    [
        ("llama", False),
        pytest.param("llama", True, marks=pytest.mark.slow),
        ("gemma2", False),
        ("gemma2", True),
    ],
    ids=["loop-llama", "scan-llama", "loop-gemma2", "scan-gemma2"],
)
def test_model_blocked_equals_xla_attention(family, scan_layers):
    """The whole model with attention="blocked" (default) and "xla" (dense masks): same logits and
    parameter gradients on a packed batch with padding (gemma2: soft-capping and a sliding window on
    alternate layers, traced under scan)."""
    config = ModelConfig.from_hf(HF_CONFIGS[family])
    models = {}
    for attention in ("blocked", "xla"):
        options = ModelOptions(scan_layers=scan_layers, attention=attention)
        models[attention] = Transformer(config, options=options, rngs=nnx.Rngs(0))
    B, T = 2, 40
    seg = packed_segments(np.random.default_rng(3), B, T)
    pos = np.zeros_like(seg)
    for b in range(B):
        for s in np.unique(seg[b][seg[b] > 0]):
            idx = np.flatnonzero(seg[b] == s)
            pos[b, idx] = np.arange(len(idx))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (B, T)), jnp.int32)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    real = np.asarray(seg) > 0

    def loss(m):
        logits = m(ids, pos, seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits

    out = {a: nnx.jit(nnx.value_and_grad(loss, has_aux=True))(m) for a, m in models.items()}
    (lb, logits_b), gb = out["blocked"]
    (lx, logits_x), gx = out["xla"]
    np.testing.assert_allclose(np.asarray(logits_b)[real], np.asarray(logits_x)[real], atol=2e-5)
    np.testing.assert_allclose(lb, lx, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gx), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_attention_block_is_a_tiling_choice_only():
    """model.attention_block changes the tiles, not the numbers; a non-positive block is refused."""
    config = ModelConfig.from_hf(HF_CONFIGS["llama"])
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 24)), jnp.int32)
    seg = jnp.asarray(packed_segments(np.random.default_rng(6), 2, 24))
    logits = [
        nnx.jit(lambda m: m(ids, None, seg))(
            Transformer(config, options=ModelOptions(attention_block=b), rngs=nnx.Rngs(0))
        )
        for b in (4, 64)
    ]
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(logits[0])[real], np.asarray(logits[1])[real], atol=1e-5)
    with pytest.raises(ValueError, match="attention_block must be >= 0"):
        Transformer(config, options=ModelOptions(attention_block=-1), rngs=nnx.Rngs(0))


# Slow; in the default run the kernel it serves is checked against dense attention.
@pytest.mark.slow
def test_spans_match_a_scan_for_ids_in_any_order():
    from jdpo.models.attention import _spans

    rng = np.random.default_rng(7)
    for _ in range(50):
        ids = rng.integers(-3, 7, int(rng.integers(1, 40)))
        first, pfirst, plast = (np.asarray(x) for x in _spans(jnp.asarray(ids)))
        np.testing.assert_array_equal(first, [int(np.flatnonzero(ids == x)[0]) for x in ids])
        for t, x in enumerate(ids):
            at = np.flatnonzero(ids == -((x + 1) // 2)) if x > 0 else []
            assert (pfirst[t], plast[t]) == ((at[0], at[-1]) if len(at) else (-1, -1))


def test_no_T_by_T_intermediate_forward_or_backward():
    """The kernel's point: nothing of T x T size exists (checked on the traced program, loop bodies
    included), so long rows cost memory linear in T."""
    from helpers_jaxpr import intermediate_sizes

    B, T, N, K, H = 1, 512, 2, 2, 8
    q, k, v = qkv(B, T, N, K, H)
    seg = jnp.asarray(packed_segments(np.random.default_rng(8), B, T))
    f = jax.grad(
        lambda q, k, v: jnp.sum(blocked_attention(q, k, v, AttentionMask(seg), scale=0.3, block=64) ** 2),
        (0, 1, 2),
    )

    all_sizes = intermediate_sizes(jax.make_jaxpr(f)(q, k, v).jaxpr)
    assert N * 64 * 64 in all_sizes  # the walk reached the [K, G, C, C] tiles inside the loops
    assert max(all_sizes) < T * T // 8
