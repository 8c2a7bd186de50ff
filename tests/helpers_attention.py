"""Shared by the attention kernel tests: dense masked attention written out, packed segment ids and
random q / k / v."""

import jax
import jax.numpy as jnp
import numpy as np


def dense_reference(q, k, v, seg, *, scale, softcap=None, window=None):
    """Explicit softmax attention with the kernel's visibility rule (padding sees only itself)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    t = jnp.arange(T)
    visible = (seg[:, :, None] == seg[:, None, :]) & (t[None, :, None] >= t[None, None, :])
    if window is not None:
        visible &= (t[:, None] - t[None, :] < window)[None]
    visible = jnp.where((seg == 0)[:, :, None], jnp.eye(T, dtype=bool)[None], visible)
    kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kk) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible[:, None], s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), vv)


def packed_segments(rng, B, T, fill=0.85):
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, s = 0, 1
        while t < int(T * fill):
            n = min(int(rng.integers(1, T // 2)), int(T * fill) - t)
            seg[b, t : t + n] = s
            s, t = s + 1, t + n
    return seg


def qkv(B, T, N, K, H, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (B, T, n, H), dtype) for kk, n in zip(ks, (N, K, K), strict=True))


def segment_positions(seg):
    """Positions within each segment (restarting at 0), 0 in padding, for [B, T] segment ids."""
    seg = np.asarray(seg)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for s in np.unique(seg[b][seg[b] > 0]):
            idx = np.flatnonzero(seg[b] == s)
            pos[b, idx] = np.arange(len(idx))
    return pos
