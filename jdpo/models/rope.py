"""Rotary position embeddings as Hugging Face computes them: default, linear, Llama 3 and LongRoPE scaling,
and per-layer kinds (a sliding layer's own base, NoPE layers).

A model's layers apply one of at most three RoPE kinds (`ModelConfig.layer_rope`): 0 the global one (with
its scaling), 1 the sliding layers' own unscaled base (gemma3's rope_local_base_freq, olmo3's
sliding_attention parameters), 2 none (smollm3's NoPE layers: cos = 1, sin = 0, which rotates nothing,
exactly). `rope_tables` builds the kinds a model uses once per forward, stacked, so a layer picks its
table by index: a Python int in a layer loop, a traced one under a layer scan (one compiled body).
"""

import math

import jax.numpy as jnp
import numpy as np

from jdpo.models.config import ModelConfig

GLOBAL, LOCAL, NONE = 0, 1, 2


def rope_inv_freq(config: ModelConfig, *, kind: int = GLOBAL, long: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] in float32 numpy. `kind` LOCAL: the sliding layers' unscaled base;
    `long`: LongRoPE's long factors (rows beyond the original length) instead of the short ones."""
    H = config.head_dim
    exponents = np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H
    if kind == LOCAL:
        return (1.0 / (config.local_rope_theta**exponents)).astype(np.float32)
    inv_freq = (1.0 / (config.rope_theta**exponents)).astype(np.float32)
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by factor, interpolate in between.
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif config.rope_type == "longrope":
        # Phi-3: each frequency divided by its own factor, short or long by the row length.
        factors = np.asarray(config.rope_long_factor if long else config.rope_short_factor, np.float32)
        inv_freq = (1.0 / (factors * config.rope_theta**exponents)).astype(np.float32)
    elif config.rope_type == "yarn":
        inv_freq = _yarn(config, exponents, inv_freq)
    elif config.rope_type != "default":
        raise ValueError(f"rope_type {config.rope_type!r} is not implemented")
    return inv_freq


def _yarn(config: ModelConfig, exponents, inv_freq) -> np.ndarray:
    """YaRN (gpt_oss): the original frequencies above the ramp, divided by `factor` below it, mixed
    linearly across the ramp between the dimensions that turn beta_fast and beta_slow times over the
    original length (transformers' `_compute_yarn_parameters`)."""
    H, base, L0 = config.head_dim, config.rope_theta, config.rope_original_max_position_embeddings

    def dim_of(rotations):
        return H * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(config.rope_beta_fast), dim_of(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, H - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(H // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = (base**exponents).astype(np.float32)
    interpolated = 1.0 / (config.rope_factor * pos_freqs)
    return (interpolated * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def rope_cos_sin(positions_BxT, config: ModelConfig, dtype, kind: int = GLOBAL):
    """cos, sin [B, T, 1, H] (broadcast over heads) in the compute dtype, like HF's rotary embedding.

    LongRoPE takes its long factors when any position of the call is at or beyond the original length
    (transformers decides on max(position_ids) + 1 of the call, for the whole batch: so do we)."""
    B, T = positions_BxT.shape
    if kind == NONE:
        ones = jnp.ones((B, T, 1, config.head_dim), dtype)
        return ones, jnp.zeros_like(ones)
    inv_freq_H2 = jnp.asarray(rope_inv_freq(config, kind=kind))
    scale = 1.0
    if kind == GLOBAL and config.rope_type == "longrope":
        long_H2 = jnp.asarray(rope_inv_freq(config, long=True))
        beyond = jnp.max(positions_BxT) + 1 > config.rope_original_max_position_embeddings
        inv_freq_H2 = jnp.where(beyond, long_H2, inv_freq_H2)
        scale = config.rope_attention_factor
    elif kind == GLOBAL and config.rope_type == "yarn":
        scale = config.rope_attention_factor
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
    emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    cos, sin = jnp.cos(emb_BxTxH) * scale, jnp.sin(emb_BxTxH) * scale
    return cos[:, :, None, :].astype(dtype), sin[:, :, None, :].astype(dtype)


def rope_tables(positions_BxT, config: ModelConfig, dtype):
    """The RoPE kinds the model's layers use, stacked: (cos, sin [R, B, T, 1, H], per-layer row index)."""
    kinds = sorted(set(config.layer_rope))
    tables = [rope_cos_sin(positions_BxT, config, dtype, kind) for kind in kinds]
    cos_RxBxTx1xH = jnp.stack([c for c, _ in tables])
    sin_RxBxTx1xH = jnp.stack([s for _, s in tables])
    return cos_RxBxTx1xH, sin_RxBxTx1xH, tuple(kinds.index(k) for k in config.layer_rope)


def apply_rope(x_BxTxNxH, cos, sin):
    """Rotate-half RoPE (the HF layout: first and second halves of head_dim are the pairs)."""
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return x_BxTxNxH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
