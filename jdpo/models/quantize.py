"""The frozen base's projection kernels stored quantised (`lora.quantize`), dequantised inside the matmul.

A kernel has the layout [*lead, *in, *out] (lead: () or the stacked layers' (L,) under `scan_layers`;
in / out may be per-head shapes, e.g. o_proj's in (N, H)). Two formats:

  int8  symmetric per output channel: codes int8 [*lead, *in, *out], scale float32 [*lead, *out],
        kernel ~= codes * scale with scale = absmax over the input axes / 127. 8.0 bits per weight
        plus one float32 per output channel.
  nf4   QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): blocks of `block_size` consecutive weights
        along the LAST input axis, each scaled by its absmax into [-1, 1] and rounded to the nearest
        of the 16 NF4 values; two 4-bit codes per uint8 along that axis. codes uint8
        [*lead, *in[:-1], in[-1] / 2, *out] (the first weight of each pair in the high nibble),
        scale float32 [*lead, *in[:-1], in[-1] / block, *out]. 4.5 bits per weight with block 64
        (4 + 32 / 64; QLoRA's double quantisation of the scales, which brings that to ~4.13, is not done).

Blocks run along the input axis as in QLoRA, whose blocks are consecutive elements of the torch
[out, in] weight. Codes and scales keep the kernel's logical axis names, so they shard like it.
"""

from __future__ import annotations

from statistics import NormalDist

import jax.numpy as jnp
import numpy as np

__all__ = ["FORMATS", "NF4", "block_size", "dequantize", "float_shape", "quantize"]

FORMATS = ("int8", "nf4")

#: The 16 NF4 values: 8 positive and 7 negative quantiles of N(0, 1) (the outermost at
#: p = 0.5 * (1 / 32 + 1 / 30) from either end), and an exact 0, normalised to [-1, 1].
#: Equal to bitsandbytes' table (`create_normal_map`) to float32 rounding.
_OFFSET = 0.9677083
_N01 = NormalDist()
_positive = [_N01.inv_cdf(p) for p in np.linspace(_OFFSET, 0.5, 9)[:-1]]
_negative = [-_N01.inv_cdf(p) for p in np.linspace(_OFFSET, 0.5, 8)[:-1]]
_values = np.sort(np.asarray(_positive + [0.0] + _negative))
NF4 = (_values / np.abs(_values).max()).astype(np.float32)
# Rounding to the nearest NF4 value is a search among the midpoints between neighbours.
_MIDPOINTS = ((NF4[1:] + NF4[:-1]) / 2).astype(np.float32)

NF4_BLOCK = 64  # QLoRA's block size


def block_size(in_last: int) -> int:
    """NF4's block along the last input axis: 64 (QLoRA's), or the largest even divisor of a shorter
    or indivisible axis up to 64 (tiny test models: a head dim of 16 gives 16)."""
    if in_last % 2:
        raise ValueError(f"nf4 packs two weights per byte along the input axis; its size {in_last} is odd")
    return max(b for b in range(2, min(NF4_BLOCK, in_last) + 1, 2) if in_last % b == 0)


def quantize(kernel, kind: str, *, n_in: int, n_out: int):
    """(codes, scale) of a float kernel [*lead, *in, *out] (see the module docstring)."""
    k32 = jnp.asarray(kernel, jnp.float32)
    if kind == "int8":
        in_axes = tuple(range(k32.ndim - n_out - n_in, k32.ndim - n_out))
        scale = jnp.max(jnp.abs(k32), axis=in_axes, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        codes = jnp.clip(jnp.round(k32 / scale), -127, 127).astype(jnp.int8)
        return codes, jnp.squeeze(scale, in_axes)
    if kind != "nf4":
        raise ValueError(f"unknown quantisation {kind!r} (known: {', '.join(FORMATS)})")
    ax = k32.ndim - n_out - 1
    size = k32.shape[ax]
    block = block_size(size)
    blocked = k32.reshape(*k32.shape[:ax], size // block, block, *k32.shape[ax + 1 :])
    absmax = jnp.max(jnp.abs(blocked), axis=ax + 1, keepdims=True)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    index = jnp.searchsorted(jnp.asarray(_MIDPOINTS), blocked / absmax).astype(jnp.uint8)
    pairs = index.reshape(*k32.shape[:ax], size // 2, 2, *k32.shape[ax + 1 :])
    high = jnp.take(pairs, 0, axis=ax + 1)
    low = jnp.take(pairs, 1, axis=ax + 1)
    return (high << 4) | low, jnp.squeeze(absmax, ax + 1)


def dequantize(codes, scale, kind: str, *, n_in: int, n_out: int, dtype):
    """The float kernel [*lead, *in, *out] in `dtype` from its (codes, scale)."""
    if kind == "int8":
        lead_in = scale.shape[: scale.ndim - n_out]
        scale = scale.reshape(*lead_in, *(1,) * n_in, *scale.shape[scale.ndim - n_out :])
        return codes.astype(dtype) * scale.astype(dtype)
    ax = codes.ndim - n_out - 1
    index = jnp.stack([codes >> 4, codes & 0xF], axis=ax + 1)
    size = codes.shape[ax] * 2
    blocks = scale.shape[ax]
    values = jnp.asarray(NF4, dtype)[index.astype(jnp.int32)]
    values = values.reshape(*codes.shape[:ax], blocks, size // blocks, *codes.shape[ax + 1 :])
    kernel = values * jnp.expand_dims(scale.astype(dtype), ax + 1)
    return kernel.reshape(*codes.shape[:ax], size, *codes.shape[ax + 1 :])


def float_shape(kind: str, codes_shape: tuple[int, ...], n_out: int) -> tuple[int, ...]:
    """The float kernel's shape from its codes' shape."""
    if kind == "int8":
        return tuple(codes_shape)
    ax = len(codes_shape) - n_out - 1
    return (*codes_shape[:ax], codes_shape[ax] * 2, *codes_shape[ax + 1 :])
