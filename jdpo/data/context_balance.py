"""Rows split over the mesh's "context" axis, balanced per block of tokens (`model.context_balance:
blocks`): packed documents of any length give every device the same causal attention work.

Under causal attention a query's cost grows with the keys it sees: its position within its document
(plus the shared prompt, for a branch). The fixed balanced layout of `jdpo.parallel.context_layout`
(device i: chunks i and 2C - 1 - i of the row) evens that out for ONE document filling the row; a packed
row of documents of unequal lengths is not one triangle, and there the slowest device sets the step.
On packed rows of long-context-shaped pairs (prompts ~3k tokens, log-normal, rows of 32k) the busiest
device does 1.18x the mean work at context 4 and 1.40x at context 8 (median row, plain layout;
`experiments/bench/context_balance.py`); dealt in blocks, 1.00x.

How: the host cuts the row (laid out in its natural order by `jdpo.data.batching.make_batch`) into blocks
of `unit` tokens (the kernel's tile on a shard), weighs each block by what the kernel spends on it, the
key tiles its queries visit (`tile_work`), and deals the blocks to
the C devices, heaviest first, each to the least-loaded device that still has room (every device takes
T / (C unit) blocks; longest-processing-time-first with a capacity). Device d's blocks, in their row
order, make up the d-th contiguous shard of the row the model receives: every [B, T] field of the batch
is permuted that way and `Batch.slots` records each token's natural row slot.

What reads it: the all-gather context attention (`jdpo.models.context_attention`) gathers the row's keys
and values and puts them back in natural order by `slots`, and its queries carry their natural slots, so
the blocked kernel's visibility rule and block skipping are those of the natural row; `unit` is the
kernel's tile on a shard, so a query tile is one run of natural positions. Everything else in the model
is per token, and the per-pair sums are per segment: neither cares about order. The FLOP counts
(`jdpo.report.flops`) read the rows back in natural order.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from jdpo.parallel.context_layout import natural_order, shard_block


@dataclasses.dataclass(frozen=True)
class BlockBalance:
    """Rows split over `devices` (mesh.context), for the blocked kernel's tile `block`."""

    devices: int
    block: int

    def unit(self, row_length: int) -> int | None:
        """Tokens per dealt block of rows of `row_length`: the kernel's tile on a shard
        (`context_layout.shard_block`); None where such rows do not split (`context_layout.splits`: they
        run whole on every device, in their natural order)."""
        if row_length % (2 * self.devices):
            return None
        return shard_block(row_length, self.devices, self.block)


def tile_work(segment_ids_T: np.ndarray, unit: int) -> np.ndarray:
    """The blocked kernel's cost of each tile of `unit` queries of a row in natural order: the key tiles
    it visits (`jdpo.models.attention`'s ranges): its own segment's from the tile holding the earliest
    segment start among its queries to itself, and its shared prefix's (a branch's prompt) before that;
    a padding tile visits itself. int64 [T / unit]."""
    seg = np.asarray(segment_ids_T, np.int64)
    T, G = len(seg), unit
    ids, first, counts = np.unique(seg, return_index=True, return_counts=True)
    t = np.arange(T)
    lo = np.where(seg == 0, t, first[np.searchsorted(ids, seg)])
    want = np.where(seg > 0, -((seg + 1) // 2), 0)  # masks.prefix of a branch; 0: none
    hit = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
    found = (want < 0) & (ids[hit] == want)
    pfirst = np.where(found, first[hit], 2 * T)
    plast = np.where(found, first[hit] + counts[hit] - 1, -1)
    own = lo.reshape(-1, G).min(axis=1) // G
    p0 = pfirst.reshape(-1, G).min(axis=1) // G
    p1 = np.minimum(plast.reshape(-1, G).max(axis=1) // G, own - 1)
    return (np.arange(T // G) - own + 1) + np.maximum(p1 - p0 + 1, 0)


def deal_blocks(segment_ids_T: np.ndarray, devices: int, unit: int) -> np.ndarray:
    """The order [T] (natural slots) in which a row's tokens reach the model: device d's blocks of `unit`
    tokens, in row order, make up its contiguous shard T / C; blocks dealt heaviest first to the
    least-loaded device with room. Deterministic (ties: the earlier block, the lower device)."""
    T, C, G = len(segment_ids_T), devices, unit
    if T % (C * G):
        raise ValueError(f"rows of {T} tokens do not deal into {C} devices x blocks of {G}")
    per_device = T // (C * G)
    weights = tile_work(segment_ids_T, G)
    heap = [(0, d) for d in range(C)]
    owned: list[list[int]] = [[] for _ in range(C)]
    for j in np.argsort(-weights, kind="stable").tolist():
        load, d = heapq.heappop(heap)
        owned[d].append(j)
        if len(owned[d]) < per_device:
            heapq.heappush(heap, (load + int(weights[j]), d))
    blocks = np.concatenate([np.sort(b) for b in owned])
    return (blocks[:, None] * G + np.arange(G)[None, :]).reshape(T).astype(np.int32)


def device_work(segment_ids_T: np.ndarray, devices: int, unit: int, slots_T: np.ndarray | None = None):
    """The blocked kernel's cost (key tiles visited, `tile_work`) of each of `devices` shards of a row:
    with `slots_T` (a dealt row: its natural slots) the contiguous shards of the dealt row, else the fixed
    balanced layout (device i: chunks i and 2C - 1 - i of the natural row). int64 [devices]."""
    if slots_T is None:
        chunks = tile_work(segment_ids_T, unit).reshape(2 * devices, -1).sum(axis=1)
        return np.array([chunks[i] + chunks[2 * devices - 1 - i] for i in range(devices)])
    natural = natural_order(np.asarray(segment_ids_T)[None], np.asarray(slots_T)[None])[0]
    tiles = np.asarray(slots_T)[::unit] // unit  # the dealt order of the natural tiles
    return tile_work(natural, unit)[tiles].reshape(devices, -1).sum(axis=1)
