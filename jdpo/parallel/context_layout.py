"""The load-balanced token layout of a context-split row (mesh axis "context", size C).

A row of T tokens is cut into 2C chunks of T / 2C. Under causal attention a late chunk's queries see
far more keys than an early one's, so contiguous shards (device i: chunks 2i and 2i + 1) would leave
device C - 1 with ~(4C - 1) / C^2 of the work and device 0 with 1 / C^2 of it. Device i holds chunk i and
chunk 2C - 1 - i instead (as TransformerEngine and PyTorch's context-parallel load balancer do): every
device then has one early and one late chunk, the same causal work for one long sequence.

The model (`jdpo.models.transformer.Transformer.hidden_states`) takes and returns rows in their natural
order, sharded contiguously over "context" (what `with_sharding_constraint` gives): `to_balanced` moves
the token ids, positions and segment ids into the balanced layout at the start (positions and segment
ids travel with their tokens, so RoPE and the masks follow the packed layout), everything per token
(norms, MLPs) runs on it unchanged, attention reads it through `gather_keys` / `local_slots`,
and `from_balanced` moves the final hidden states back. Each move is two `ppermute`s of a shard's two
chunks (every device sends and receives exactly one even and one odd chunk), never a gather of the row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jdpo.parallel.sharding import CONTEXT_AXIS, context_size, current_mesh, logical_to_spec


def splits(T: int) -> int:
    """Over how many devices rows of T tokens split under the current mesh: its context size C when T
    cuts into 2C chunks, else 1 (rows of another length, e.g. sampled sequences or `jdpo eval`'s rows,
    run whole on every device of the context group: the model's activation constraints replicate a
    token axis that does not divide). Training rows always split: `jdpo.config.context` refuses a row
    length that does not."""
    C = context_size()
    return C if C > 1 and T % (2 * C) == 0 else 1


def shard_block(T: int, C: int, block: int) -> int:
    """The attention kernel's tile on a context shard of rows of T tokens: a divisor of the chunk
    (T / 2C) no larger than `block`."""
    return math.gcd(block, T // (2 * C))


def chunk_owner(c: int, C: int) -> tuple[int, int]:
    """(device, slot) of chunk c of 2C in the balanced layout: chunk c < C is device c's first chunk,
    chunk c >= C device 2C - 1 - c's second."""
    return (c, 0) if c < C else (2 * C - 1 - c, 1)


def balanced_order(C: int) -> list[int]:
    """The row's chunks in the order the balanced layout lays them end to end over the devices:
    [0, 2C - 1, 1, 2C - 2, ...] (device i's chunks i and 2C - 1 - i)."""
    return [c for i in range(C) for c in (i, 2 * C - 1 - i)]


def local_slots(Tl: int, C: int) -> jax.Array:
    """Inside a shard_map over "context": the row slots [Tl] (traced int32) of this device's balanced
    shard of Tl = T / C positions, chunks i and 2C - 1 - i."""
    i = jax.lax.axis_index(CONTEXT_AXIS).astype(jnp.int32)
    chunk = Tl // 2
    return jnp.concatenate([s * chunk + jnp.arange(chunk, dtype=jnp.int32) for s in (i, 2 * C - 1 - i)])


def gather_keys(x_BxTlx, C: int) -> jax.Array:
    """Inside a shard_map over "context": every device's balanced shard [B, T / C, ...] -> the whole row
    in its natural order [B, T, ...] (an all-gather, then a fixed reordering of the 2C chunks)."""
    B, Tl = x_BxTlx.shape[:2]
    rest = x_BxTlx.shape[2:]
    gathered = jax.lax.all_gather(x_BxTlx, CONTEXT_AXIS, axis=1, tiled=True)  # chunks in balanced order
    chunks = gathered.reshape(B, 2 * C, Tl // 2, *rest)
    where = {c: k for k, c in enumerate(balanced_order(C))}
    natural = jnp.asarray([where[c] for c in range(2 * C)], jnp.int32)
    return jnp.take(chunks, natural, axis=1).reshape(B, C * Tl, *rest)


def gather_dealt(x_BxTlx, slots_BxTl) -> jax.Array:
    """Inside a shard_map over "context": every device's shard of a row dealt in blocks
    (`jdpo.data.context_balance`, the natural row slot of each position in `slots_BxTl`) -> the whole
    row in its natural order [B, T, ...] (an all-gather, then each row's inverse permutation)."""
    gathered = jax.lax.all_gather(x_BxTlx, CONTEXT_AXIS, axis=1, tiled=True)
    slots = jax.lax.all_gather(slots_BxTl, CONTEXT_AXIS, axis=1, tiled=True)
    return jax.vmap(lambda x, s: x[jnp.argsort(s)])(gathered, slots)


def _exchange(x_BxTlx, C: int, *, forward: bool) -> jax.Array:
    """One shard's two chunks moved between the contiguous layout (device i: chunks 2i, 2i + 1) and the
    balanced one (device i: chunks i, 2C - 1 - i): `forward` contiguous -> balanced."""
    i = jax.lax.axis_index(CONTEXT_AXIS)
    half = x_BxTlx.shape[1] // 2
    first, second = x_BxTlx[:, :half], x_BxTlx[:, half:]
    if forward:
        # Chunk 2d (even) and 2d + 1 (odd) go to their balanced owners; each device gets one of each.
        even = jax.lax.ppermute(first, CONTEXT_AXIS, [(d, chunk_owner(2 * d, C)[0]) for d in range(C)])
        odd = jax.lax.ppermute(second, CONTEXT_AXIS, [(d, chunk_owner(2 * d + 1, C)[0]) for d in range(C)])
        # Device i's chunk i is even when i is: it is the first of its pair.
        mine_even = i % 2 == 0
        return jnp.concatenate([jnp.where(mine_even, even, odd), jnp.where(mine_even, odd, even)], axis=1)
    # Backward: device d holds chunks d (slot 0) and 2C - 1 - d (slot 1); the even one goes to the
    # first half of device (its index) // 2, the odd one to the second half.
    mine_even = i % 2 == 0
    even_chunk = jnp.where(mine_even, first, second)
    odd_chunk = jnp.where(mine_even, second, first)
    even_of = {d: d if d % 2 == 0 else 2 * C - 1 - d for d in range(C)}
    odd_of = {d: 2 * C - 1 - d if d % 2 == 0 else d for d in range(C)}
    even = jax.lax.ppermute(even_chunk, CONTEXT_AXIS, [(d, even_of[d] // 2) for d in range(C)])
    odd = jax.lax.ppermute(odd_chunk, CONTEXT_AXIS, [(d, odd_of[d] // 2) for d in range(C)])
    return jnp.concatenate([even, odd], axis=1)


def _move(x_BxTx, *, forward: bool):
    mesh, C = current_mesh(), splits(x_BxTx.shape[1])
    if C == 1:
        return x_BxTx
    names = ("batch", "length") + (None,) * (x_BxTx.ndim - 2)
    spec = logical_to_spec(names, x_BxTx.shape, mesh)
    spec = PartitionSpec(spec[0], CONTEXT_AXIS, *spec[2:])
    fn = jax.shard_map(
        lambda x: _exchange(x, C, forward=forward), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
    )
    return fn(x_BxTx)


def to_balanced(x_BxTx):
    """[B, T, ...] in the natural token order -> the balanced layout (still [B, T, ...], sharded over
    "context": device i's shard holds chunks i and 2C - 1 - i). Identity where rows do not split
    (`splits`)."""
    return _move(x_BxTx, forward=True)


def from_balanced(x_BxTx):
    """The inverse of `to_balanced`."""
    return _move(x_BxTx, forward=False)


def split_rows(x_BxTx):
    """[B, T, ...] in the natural order, tokens over "context" -> [B C, T / C, ...]: each row's C
    contiguous shards as rows of their own, on the device that holds them (rows over the batch axes
    and "context"), so per-token work that regroups positions (the chunked log-probs) stays local.
    Identity where rows do not split (`splits`)."""
    mesh, C = current_mesh(), splits(x_BxTx.shape[1])
    if C == 1:
        return x_BxTx
    B, T = x_BxTx.shape[:2]
    rows = logical_to_spec(("batch",), (B,), mesh)[0]
    rows = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)
    out = x_BxTx.reshape(B * C, T // C, *x_BxTx.shape[2:])
    spec = PartitionSpec((*rows, CONTEXT_AXIS), *(None,) * (out.ndim - 1))
    return jax.lax.with_sharding_constraint(out, jax.sharding.NamedSharding(mesh, spec))


def join_rows(x_BCx, C: int):
    """The per-row sums of `split_rows`' rows of rows that split over C devices (`splits`): [B C, ...] ->
    [B, ...] (a sum over "context")."""
    if C == 1:
        return x_BCx
    return x_BCx.reshape(-1, C, *x_BCx.shape[1:]).sum(axis=1)


def natural_order(x_BxT, slots_BxT):
    """Host side: a [B, T] field of rows dealt in blocks (`jdpo.data.context_balance`, natural row slots
    `slots_BxT`) back in its rows' natural order; as is without slots (None)."""
    if slots_BxT is None:
        return np.asarray(x_BxT)
    out = np.empty_like(np.asarray(x_BxT))
    np.put_along_axis(out, np.asarray(slots_BxT), np.asarray(x_BxT), axis=1)
    return out
