"""jdpo's Pallas GPU flash kernel (`jdpo.models.flash_gpu`) alone, in Pallas' interpret mode on the CPU,
against dense float32 attention written out here: values, log-sum-exps and the gradients of q, k, v
with separate query and key segment ids, a query offset (causality across chunks), grouped-query heads,
a sliding window with soft-capped scores, fully visible key chunks, and query rows that see nothing
(output 0, log-sum-exp NEG, no NaN); and the backward given another call's log-sum-exp (the ring's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpo.models import attention, flash_gpu


def _dense(q, k, v, ids_q, ids_k, *, offset, causal, window, softcap, scale):
    """(out [B, N, Lq, H], lse [B, N, Lq]) of masked softmax attention; rows seeing nothing: 0, NEG."""
    N, K, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk, vv = jnp.repeat(k, N // K, axis=1), jnp.repeat(v, N // K, axis=1)
    s = jnp.einsum("bnth,bnsh->bnts", q, kk, precision="highest") * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    q_pos, k_pos = offset + jnp.arange(Lq), jnp.arange(Lk)
    visible = ids_q[:, :, None] == ids_k[:, None, :]
    if causal:
        visible &= (k_pos[None, :] <= q_pos[:, None])[None]
    if window is not None:
        visible &= (q_pos[:, None] - k_pos[None, :] < window)[None]
    visible = visible[:, None]
    s = jnp.where(visible, s, -1e30)
    seen = jnp.any(visible, axis=-1)
    lse = jnp.where(seen, jax.nn.logsumexp(s, axis=-1), 0.0)
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    out = jnp.einsum("bnts,bnsh->bnth", p, vv, precision="highest")
    return out, jnp.where(seen, lse, attention.NEG)


def _inputs(B, N, K, Lq, Lk, H, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.standard_normal((B, n, L, H)), jnp.float32) for n, L in ((N, Lq), (K, Lk), (K, Lk))
    )
    w = jnp.asarray(rng.standard_normal((B, N, Lq, H)), jnp.float32)
    return q, k, v, w


CASES = {
    # the diagonal: causal from position 0 of both, ids differing between queries and keys, a query
    # segment (7) that no key has (those rows see nothing), 4 query heads over 2 kv heads, H = 8 (padded)
    "diagonal_gqa": dict(N=4, K=2, Lq=32, Lk=32, H=8, offset=0, causal=True, window=None, softcap=None),
    # queries 40 positions after the keys start (a later chunk), a window of 20 reaching partly into the
    # key chunk, soft-capped scores, one kv head
    "offset_window_softcap": dict(
        N=2, K=1, Lq=32, Lk=64, H=16, offset=40, causal=True, window=20, softcap=2.0
    ),  # fmt: skip
    # a key chunk wholly in the queries' past: no causal mask
    "full": dict(N=2, K=2, Lq=16, Lk=64, H=32, offset=0, causal=False, window=None, softcap=None),
}


def _ids(B, Lq, Lk, seed=1):
    rng = np.random.default_rng(seed)
    ids_k = np.sort(rng.integers(1, 4, (B, Lk)), axis=1).astype(np.int32)
    ids_q = np.sort(rng.integers(1, 4, (B, Lq)), axis=1).astype(np.int32)
    ids_q[0, :5] = 7  # seen by no key
    return jnp.asarray(ids_q), jnp.asarray(ids_k)


# "full" is slow (~10 s): the ring's off-diagonal chunk pairs are full-mask calls, checked against dense
# attention in tests/test_context_kernels.py.
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "full" else c for c in CASES]
)
def test_flash_gpu_equals_dense_attention(case):
    c = dict(CASES[case])
    N, K, Lq, Lk, H = (c.pop(x) for x in ("N", "K", "Lq", "Lk", "H"))
    B, scale = 2, 0.4
    q, k, v, w = _inputs(B, N, K, Lq, Lk, H)
    ids_q, ids_k = _ids(B, Lq, Lk)
    kw = dict(c, scale=scale)

    out, lse = flash_gpu.forward(q, k, v, ids_q, ids_k, block_q=16, block_k=16, interpret=True, **kw)
    want_out, want_lse = _dense(q, k, v, ids_q, ids_k, **kw)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=2e-6)
    np.testing.assert_array_equal(out[0, :, :5], 0.0)
    np.testing.assert_array_equal(lse[0, :, :5], np.float32(attention.NEG))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    def kernel(q, k, v):
        return flash_gpu.flash_attention(q, k, v, ids_q, ids_k, block_q=16, block_k=32, bwd_block_q=16,
                                         bwd_block_k=16, interpret=True, **kw)  # fmt: skip

    got_g = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want_g = jax.grad(loss(lambda *a: _dense(*a, ids_q, ids_k, **kw)[0]), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got_g, want_g, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=2e-5)


# slow (14 s): the ring's gradients against dense attention (tests/test_context_kernels.py) run every
# pair's backward from the whole attention's log-sum-exp.
@pytest.mark.slow
def test_flash_gpu_backward_takes_the_whole_attentions_lse():
    """Two calls over disjoint key halves merged by log-sum-exp (what the ring does): each call's
    backward given the merged out / lse sums to the gradients of attention over all the keys."""
    B, N, K, L, H = 1, 2, 1, 32, 16
    q, k, v, w = _inputs(B, N, K, L, 2 * L, H, seed=3)
    ids_q, ids_k = jnp.ones((B, L), jnp.int32), jnp.ones((B, 2 * L), jnp.int32)
    kw = dict(causal=True, window=None, softcap=1.5, scale=0.5)
    halves = [
        (k[:, :, :L], v[:, :, :L], dict(offset=L, causal=False)),
        (k[:, :, L:], v[:, :, L:], dict(offset=0)),
    ]
    parts = [flash_gpu.forward(q, kh, vh, ids_q, ids_k[:, :L], interpret=True, block_q=16, block_k=16,
                               **{**kw, **o}) for kh, vh, o in halves]  # fmt: skip
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    out = sum(o * jnp.exp(l - lse)[..., None] for o, l in parts)
    want_out, want_lse = _dense(q, k, v, ids_q, ids_k, offset=L, **kw)
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    grads = [flash_gpu.backward(q, kh, vh, ids_q, ids_k[:, :L], out, lse, w, interpret=True, block_q=16,
                                block_k=16, **{**kw, **o}) for kh, vh, o in halves]  # fmt: skip
    dq = grads[0][0] + grads[1][0]
    dk, dv = (jnp.concatenate([grads[0][i], grads[1][i]], axis=2) for i in (1, 2))
    want = jax.grad(lambda q, k, v: jnp.sum(_dense(q, k, v, ids_q, ids_k, offset=L, **kw)[0] * w),
                    argnums=(0, 1, 2))(q, k, v)  # fmt: skip
    for a, b in zip((dq, dk, dv), want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
