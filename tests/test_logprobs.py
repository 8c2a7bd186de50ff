"""Tests for jdpo.losses.logprobs: log-probs from logits and (chunked, completion-only) from hidden states, their
gradients and memory, per-segment sums of packed rows, WPO weights, and sharding over batch rows.

Expected values are computed here with numpy from the definitions, independently of the implementation.
Shapes are tiny so that compilation (not compute) dominates; keep it that way.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_jaxpr import intermediate_sizes

from jdpo.losses import logprobs as LP
from jdpo.losses import pairwise as L

B, T, D, V = 2, 7, 5, 11


def _lm_inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden_BxTxD = rng.normal(size=(B, T, D)).astype(np.float32)
    unembed_DxV = rng.normal(size=(D, V)).astype(np.float32)
    targets_BxT = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask_BxT = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], np.float32)
    return hidden_BxTxD, unembed_DxV, targets_BxT, mask_BxT


def _np_log_softmax(logits):
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        LP.token_logprobs_from_hidden(
            jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), jnp.int32), chunk_size=0
        )


def test_token_and_sequence_logprobs_match_numpy():
    h, w, t, mask = _lm_inputs()
    logits = (h.astype(np.float64) @ w).astype(np.float32)
    expected_BxT = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), t[..., None], -1)[..., 0]
    np.testing.assert_allclose(LP.token_logprobs(jnp.asarray(logits), t), expected_BxT, rtol=1e-5, atol=1e-5)
    logps_B, counts_B = LP.sequence_logprobs(jnp.asarray(logits), t, mask)
    np.testing.assert_allclose(logps_B, (expected_BxT * mask).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(counts_B, [3.0, 6.0])
    avg_B, _ = LP.sequence_logprobs(jnp.asarray(logits), t, mask, average=True)
    np.testing.assert_allclose(avg_B, (expected_BxT * mask).sum(-1) / [3.0, 6.0], rtol=1e-5)
    # bf16 logits come back as float32.
    assert LP.token_logprobs(jnp.asarray(logits, jnp.bfloat16), t).dtype == jnp.float32


def test_masked_tokens_contribute_nothing():
    h, w, t, mask = _lm_inputs()
    logits = jnp.asarray(h @ w)
    base, _ = LP.sequence_logprobs(logits, t, mask)
    # Garbage at masked positions: huge logits and out-of-vocabulary / ignore-index targets.
    garbage_logits = jnp.where(mask[..., None] > 0, logits, 1e30)
    garbage_t = np.where(mask > 0, t, -100)
    garbage_t[0, -1] = V + 5
    again, _ = LP.sequence_logprobs(garbage_logits, garbage_t, mask)
    np.testing.assert_allclose(again, base, rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(LP.sequence_logprobs(x, garbage_t, mask, average=True)[0]))(garbage_logits)
    assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0.0)
    # No completion tokens: mean is 0, counts 0, gradient finite.
    empty = jnp.zeros_like(mask)
    avg, counts = LP.sequence_logprobs(logits, t, empty, average=True)
    assert np.all(np.asarray(avg) == 0.0) and np.all(np.asarray(counts) == 0.0)
    g = jax.grad(lambda x: jnp.sum(LP.sequence_logprobs(x, t, empty, average=True)[0]))(logits)
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize(("chunk_size", "cap"), [(3, None), (5, 2.0), (64, 1.5)])
def test_chunked_hidden_path_equals_plain(chunk_size, cap):
    h, w, t, mask = _lm_inputs(seed=chunk_size)
    assert (B * T) % chunk_size != 0

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return LP.sequence_logprobs(logits, t, mask, average=True)[0]

    coef = jnp.asarray([1.0, -0.5])  # a weighted sum, so each row's gradient is scaled differently

    @jax.jit  # one compile for values, token log-probs and gradients
    def chunked(h, w):
        def objective(h, w):
            seq_B, _ = LP.sequence_logprobs_from_hidden(
                h, w, t, mask, average=True, chunk_size=chunk_size, logit_soft_cap=cap
            )
            return jnp.sum(coef * seq_B), seq_B

        (_, seq_B), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, w)
        tokens = LP.token_logprobs_from_hidden(h, w, t, chunk_size=chunk_size, logit_soft_cap=cap)
        return seq_B, tokens, grads

    seq_B, tokens_BxT, g_chunk = chunked(h, w)
    np.testing.assert_allclose(seq_B, plain(h, w), rtol=1e-5, atol=1e-5)
    logits = jnp.asarray(h @ w)
    capped = cap * jnp.tanh(logits / cap) if cap is not None else logits
    np.testing.assert_allclose(tokens_BxT, LP.token_logprobs(capped, t), rtol=1e-5, atol=1e-5)
    g_plain = jax.grad(lambda h, w: jnp.sum(coef * plain(h, w)), argnums=(0, 1))(h, w)
    for a, b in zip(g_chunk, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_bf16_inputs():
    h, w, t, mask = _lm_inputs()
    h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out, _ = LP.sequence_logprobs_from_hidden(h16, w16, t, mask, chunk_size=4)
    ref, _ = LP.sequence_logprobs(
        jnp.einsum("btd,dv->btv", h16.astype(jnp.float32), w16.astype(jnp.float32)), t, mask
    )
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda x: jnp.sum(LP.sequence_logprobs_from_hidden(x, w16, t, mask, chunk_size=4)[0]))(h16)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize(("chunk_size", "cap"), [(2, None), (3, 1.5), (64, None)])
def test_masked_hidden_path_equals_plain(chunk_size, cap):
    # mask_BxT scores the masked positions only (the others are 0): same values and gradients as plain.
    h, w, t, mask = _lm_inputs(seed=10 + chunk_size)
    coef = jnp.asarray(np.random.default_rng(2).normal(size=(B, T)).astype(np.float32))

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return jnp.where(mask > 0, LP.token_logprobs(logits, t), 0.0)

    def masked(h, w):
        return LP.token_logprobs_from_hidden(
            h, w, t, mask_BxT=mask, chunk_size=chunk_size, logit_soft_cap=cap
        )

    np.testing.assert_allclose(masked(h, w), plain(h, w), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(masked(h, w))[mask == 0] == 0.0)
    g_masked = jax.grad(lambda h, w: jnp.sum(coef * masked(h, w)), argnums=(0, 1))(h, w)
    g_plain = jax.grad(lambda h, w: jnp.sum(coef * plain(h, w)), argnums=(0, 1))(h, w)
    for a, b in zip(g_masked, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_masked_hidden_path_never_projects_unscored_positions():
    # Each row scores exactly 4 positions (scattered); with chunks of 4 they fill chunk 0 after the sort, so
    # 1 of 4 chunks runs. NaN hidden states everywhere else would poison the value or the unembedding's
    # gradient (NaN * 0) if any unscored position were projected.
    rng = np.random.default_rng(3)
    b, t_len, d, v, chunk = 3, 16, 4, 9, 4
    mask = np.zeros((b, t_len), np.float32)
    for r in range(b):
        mask[r, rng.choice(t_len, size=chunk, replace=False)] = 1.0
    h = rng.normal(size=(b, t_len, d)).astype(np.float32)
    h_nan = np.where(mask[..., None] > 0, h, np.nan).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    t = rng.integers(0, v, size=(b, t_len)).astype(np.int32)

    def f(h, w, groups=b):
        return LP._chunked(h, w, t, chunk, None, mask_BxT=mask, row_groups=groups)

    logp, n_run = jax.jit(f)(h_nan, w)
    assert int(n_run) == 1
    np.testing.assert_allclose(logp, f(h, w)[0], rtol=1e-6, atol=1e-6)
    assert int(f(h, w)[1]) == 1 and int(LP._chunked(h, w, t, chunk, None)[1]) == b * t_len // chunk
    # All rows in one group (the default): their 12 scored positions fill 3 of the 12 chunks of 4.
    logp_merged, n_merged = jax.jit(lambda h, w: f(h, w, 1))(h_nan, w)
    assert int(n_merged) == 3
    np.testing.assert_allclose(logp_merged, logp, rtol=1e-6, atol=1e-6)
    g_h, g_w = jax.jit(jax.grad(lambda h, w: jnp.sum(f(h, w)[0]), argnums=(0, 1)))(h_nan, w)
    assert np.all(np.isfinite(g_w)) and np.all(np.isfinite(np.asarray(g_h)[mask > 0]))
    assert np.all(np.asarray(g_h)[mask == 0] == 0.0)


def test_chunked_backward_never_builds_full_logits():
    # A vocabulary large enough that a float32 [B, T, V] tensor dominates everything else.
    b, t_len, d, v, chunk = 2, 64, 8, 4096, 8
    h = jnp.zeros((b, t_len, d), jnp.float32)
    w = jnp.zeros((d, v), jnp.float32)
    tg = jnp.zeros((b, t_len), jnp.int32)
    mask = jnp.ones((b, t_len), jnp.float32)

    def f(h, w):
        return jnp.sum(LP.sequence_logprobs_from_hidden(h, w, tg, mask, chunk_size=chunk)[0])

    # No intermediate of the backward pass has B*T*V elements (checked on the traced program).
    full = b * t_len * v
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h, w)

    all_sizes = intermediate_sizes(jaxpr.jaxpr)  # scan / checkpoint bodies included
    assert max(all_sizes) < full // 4
    assert chunk * v in all_sizes  # the walk did reach the per-chunk logits inside the scan (rows in 1 group)
    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile()
    mem = compiled.memory_analysis()
    if mem is not None and getattr(mem, "temp_size_in_bytes", 0):
        assert mem.temp_size_in_bytes < full * 4 // 2


def test_segment_logprobs_packed_rows():
    # Row 0: one pair (segments 1, 2) then padding; row 1: two pairs (segments 1..4), segment 3 unscored.
    logp_BxT = jnp.asarray([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])
    mask_BxT = jnp.asarray([[0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 1, 1]], jnp.float32)
    seg_BxT = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 2, 3, 4, 4]], jnp.int32)
    logps_BxS, counts_BxS = LP.segment_logprobs(logp_BxT, mask_BxT, seg_BxT, 4)
    np.testing.assert_allclose(logps_BxS, [[-5.0, -5.0, 0.0, 0.0], [-3.0, -3.0, 0.0, -11.0]])
    np.testing.assert_allclose(counts_BxS, [[2, 1, 0, 0], [2, 1, 0, 2]])
    avg_BxS, _ = LP.segment_logprobs(logp_BxT, mask_BxT, seg_BxT, 4, average=True)
    np.testing.assert_allclose(avg_BxS, [[-2.5, -5.0, 0.0, 0.0], [-1.5, -3.0, 0.0, -5.5]])
    # chosen = even columns, rejected = odd columns, as the data path lays them out.
    loss, _ = L.dpo_loss(
        logps_BxS[:, 0::2], logps_BxS[:, 1::2], logps_BxS[:, 0::2], logps_BxS[:, 1::2],
        weights=jnp.asarray([[1.0, 0.0], [1.0, 1.0]]),
    )  # fmt: skip
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)


def test_wpo_weights():
    h, w, t, mask = _lm_inputs()
    logits = (h.astype(np.float64) @ w).astype(np.float64)
    logp_V = _np_log_softmax(logits)
    adj = np.take_along_axis(logp_V, t[..., None], -1)[..., 0] - np.log(np.exp(2 * logp_V).sum(-1))
    got = LP.wpo_token_logprobs(jnp.asarray(logits, jnp.float32), t)
    np.testing.assert_allclose(got, adj, rtol=1e-4, atol=1e-4)
    sums, counts = LP.segment_logprobs(got, mask, jnp.ones_like(t), 1)
    # Row 0 as chosen, row 1 as rejected, for one pair.
    weights = LP.wpo_weights(sums[0], sums[1], counts[0], counts[1])
    expected = min(1.0, math.exp((adj[0] * mask[0]).sum() / 3 + (adj[1] * mask[1]).sum() / 6))
    np.testing.assert_allclose(weights, [expected], rtol=1e-4)
    # Zero lengths and large positive sums are finite and capped at 1.
    capped = LP.wpo_weights(jnp.asarray([50.0, 0.0]), jnp.asarray([50.0, -1e4]), jnp.asarray([1.0, 0.0]), 1.0)
    np.testing.assert_allclose(capped, [1.0, 0.0], atol=1e-30)


def test_log_probs_shard_with_batch_rows():
    # Row-local by construction: with the rows split over the 8 simulated devices, results match the
    # unsharded ones and stay split by rows (no gather of the batch onto one device).
    n = len(jax.devices())
    rng = np.random.default_rng(1)
    h_BxTxD = rng.normal(size=(n, 6, 4)).astype(np.float32)
    w_DxV = rng.normal(size=(4, 9)).astype(np.float32)
    t_BxT = rng.integers(0, 9, size=(n, 6)).astype(np.int32)
    seg_BxT = np.tile(np.array([1, 1, 1, 2, 2, 0], np.int32), (n, 1))
    mask_BxT = (seg_BxT > 0).astype(np.float32)
    mesh = jax.make_mesh((n,), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.jit
    def f(h, t, seg, mask):
        # One row group per batch shard (what the trainer passes): the sort stays on each device.
        logp_BxT = LP.token_logprobs_from_hidden(h, w_DxV, t, mask_BxT=mask, chunk_size=4, row_groups=n)
        return LP.segment_logprobs(logp_BxT, mask, seg, 2)[0]

    sharded = f(*(jax.device_put(x, rows) for x in (h_BxTxD, t_BxT, seg_BxT, mask_BxT)))
    np.testing.assert_allclose(sharded, f(h_BxTxD, t_BxT, seg_BxT, mask_BxT), rtol=1e-5, atol=1e-5)
    assert sharded.sharding.spec[0] == "data"


@pytest.mark.parametrize("cap", [None, 1.5])
def test_vocab_first_unembedding_equals_the_transposed_one_and_copies_no_vxd_matrix(cap):
    """A tied embedding [V, D] passed as stored (`vocab_first=True`) scores and differentiates like its
    transpose [D, V]; its gradient comes back [V, D], and the compiled backward holds no transposed copy of
    the matrix or of its gradient (on CPU, where XLA otherwise materialises both)."""
    h, w_DxV, t, mask = _lm_inputs(seed=7)
    w_VxD = jnp.asarray(w_DxV).T
    coef = jnp.asarray([1.0, -0.5])

    def objective(h, w, vocab_first):
        logp = LP.token_logprobs_from_hidden(
            h, w if vocab_first else w.T, t, mask_BxT=mask, chunk_size=3, logit_soft_cap=cap, vocab_first=vocab_first
        )
        return jnp.sum(coef[:, None] * logp)

    grad = {vf: jax.jit(jax.value_and_grad(objective, argnums=(0, 1)), static_argnums=2) for vf in (True, False)}
    (v1, (gh1, gw1)), (v0, (gh0, gw0)) = grad[True](h, w_VxD, True), grad[False](h, w_VxD, False)
    assert gw1.shape == w_VxD.shape
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(gh1, gh0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw1, gw0, rtol=1e-5, atol=1e-6)
    # A vocabulary large enough that one [V, D] float32 matrix dominates the step's temporaries.
    v, d = 8192, 64
    hb, tb, mb = jnp.zeros((2, 16, d)), jnp.zeros((2, 16), jnp.int32), jnp.ones((2, 16))
    wb = jnp.zeros((v, d))

    def temps(vocab_first):
        def f(h, w):
            logp = LP.token_logprobs_from_hidden(h, w if vocab_first else w.T, tb, mask_BxT=mb, chunk_size=8,
                                                 vocab_first=vocab_first)  # fmt: skip
            return jnp.sum(logp)

        mem = jax.jit(jax.grad(f, argnums=(0, 1))).lower(hb, wb).compile().memory_analysis()
        return None if mem is None else mem.temp_size_in_bytes

    if temps(True) is not None:
        assert temps(True) <= temps(False) - v * d * 4  # at least one [V, D] float32 copy fewer
