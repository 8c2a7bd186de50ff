"""Shared by the attention kernel tests: dense masked attention written out, packed segment ids and
random q / k / v."""

import jax
import jax.numpy as jnp
import numpy as np


def dense_reference(q, k, v, seg, *, scale, softcap=None, window=None):
    """Explicit softmax attention with the kernel's visibility rule (padding sees only itself; segment
    2k + 1 and 2k + 2 also see the shared prefix -(k + 1), written out here, not `masks.prefix`)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    t = jnp.arange(T)
    shared = (seg > 0)[:, :, None] & ((-((seg + 1) // 2))[:, :, None] == seg[:, None, :])
    visible = ((seg[:, :, None] == seg[:, None, :]) | shared) & (t[None, :, None] >= t[None, None, :])
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


def shared_prompt_segments(rng, B, T, fill=0.9):
    """Segment ids of rows of whole pairs in the shared-prompt layout: slot k's prompt (segment
    -(k + 1), sometimes empty), then its chosen (2k + 1) and rejected (2k + 2) branches; padding last."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, k = 0, 0
        while True:
            p, c, r = int(rng.integers(0, T // 4)), int(rng.integers(1, T // 6)), int(rng.integers(1, T // 6))
            if t + p + c + r > int(T * fill):
                break
            for s, n in ((-(k + 1), p), (2 * k + 1, c), (2 * k + 2, r)):
                seg[b, t : t + n] = s
                t += n
            k += 1
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
