"""The quantised base (jdpo.models.quantize): NF4's table, blockwise absmax and two codes per byte; int8 per
output channel; round-trip errors bounded by the format's half step; shapes and layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpo.models import (
    quantize as q,  # bitsandbytes' NF4 table (QLoRA, Dettmers et al. 2023, appendix E), as published.
)

PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_table_is_qloras():
    np.testing.assert_allclose(q.NF4, PUBLISHED_NF4, atol=2e-7, rtol=0)
    assert q.NF4[7] == 0.0 and q.NF4.dtype == np.float32


@pytest.mark.parametrize("in_last, block", [(4096, 64), (128, 64), (16, 16), (96, 48), (2, 2)])
def test_nf4_block_size(in_last, block):
    assert q.block_size(in_last) == block


def test_nf4_refuses_an_odd_input_axis():
    with pytest.raises(ValueError, match="odd"):
        q.block_size(7)


def nearest_nf4(kernel, block):
    """The reference: each block of `block` weights along axis -2 (the input axis of a [in, out] kernel),
    scaled by its absmax, rounded to the nearest NF4 value by brute force."""
    k = np.asarray(kernel, np.float64)
    blocks = k.reshape(k.shape[0] // block, block, k.shape[1])
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    index = np.abs((blocks / absmax)[..., None] - q.NF4.astype(np.float64)).argmin(-1)
    return index.reshape(k.shape), (q.NF4[index] * absmax).reshape(k.shape)


def test_nf4_codes_are_the_nearest_value_packed_two_per_byte():
    kernel = jax.random.normal(jax.random.key(0), (256, 24)) * 0.02
    codes, scale = q.quantize(kernel, "nf4", n_in=1, n_out=1)
    assert codes.dtype == jnp.uint8 and codes.shape == (128, 24) and scale.shape == (4, 24)
    index, want = nearest_nf4(kernel, 64)
    c = np.asarray(codes)
    np.testing.assert_array_equal(c >> 4, index[0::2])  # the first weight of a pair: high nibble
    np.testing.assert_array_equal(c & 0xF, index[1::2])
    got = np.asarray(q.dequantize(codes, scale, "nf4", n_in=1, n_out=1, dtype=jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # The largest |w| of each block is stored exactly (+-1 is in the table).
    blocks = np.abs(np.asarray(kernel)).reshape(4, 64, 24).max(1)
    np.testing.assert_array_equal(np.asarray(scale), blocks)
    # The error is at most half the widest gap of the table, times the block's absmax.
    half_gap = np.diff(q.NF4).max() / 2
    assert np.all(np.abs(got - np.asarray(kernel)) <= half_gap * np.repeat(blocks, 64, 0) * (1 + 1e-6))


def test_per_head_and_stacked_kernels_keep_their_layout():
    # o_proj-like [L, N, H, D]: blocks along H (the last input axis), per layer.
    kernel = jax.random.normal(jax.random.key(1), (3, 4, 32, 8))
    codes, scale = q.quantize(kernel, "nf4", n_in=2, n_out=1)
    assert codes.shape == (3, 4, 16, 8) and scale.shape == (3, 4, 1, 8)
    assert q.float_shape("nf4", codes.shape, 1) == kernel.shape
    got = q.dequantize(codes, scale, "nf4", n_in=2, n_out=1, dtype=jnp.float32)
    for layer in range(3):  # each [N * H, D] slab is a 2-D kernel blocked along H within each head
        for head in range(4):
            _, want = nearest_nf4(kernel[layer, head], 32)
            np.testing.assert_allclose(np.asarray(got[layer, head]), want, rtol=1e-6)


def test_int8_is_per_output_channel_within_half_a_step():
    kernel = jax.random.normal(jax.random.key(2), (2, 64, 4, 8))  # [L, D, N, H]
    codes, scale = q.quantize(kernel, "int8", n_in=1, n_out=2)
    assert codes.dtype == jnp.int8 and codes.shape == kernel.shape and scale.shape == (2, 4, 8)
    np.testing.assert_allclose(np.asarray(scale), np.abs(np.asarray(kernel)).max(1) / 127, rtol=1e-6)
    got = q.dequantize(codes, scale, "int8", n_in=1, n_out=2, dtype=jnp.float32)
    assert np.all(np.abs(np.asarray(got - kernel)) <= np.asarray(scale)[:, None] / 2 * (1 + 1e-5))


def test_a_zero_block_stays_zero():
    kernel = jnp.zeros((128, 4)).at[64:, 1].set(1.0)
    for kind in q.FORMATS:
        codes, scale = q.quantize(kernel, kind, n_in=1, n_out=1)
        got = q.dequantize(codes, scale, kind, n_in=1, n_out=1, dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(kernel))
