"""Balancing a context-split row's causal work over its devices (`model.context_balance`): the fixed chunk
layout (device i: chunks i and 2C - 1 - i) against rows dealt in blocks (`jdpo.data.context_balance`).

    python experiments/bench/context_balance.py --out results/context_balance.json

1. Work per device, no model: pairs of long-context shape (prompt log-normal around 3,000 tokens, sigma
   1, 128..24,000; chosen and rejected log-normal around 600, sigma 0.7, 32..4,000; seed 0) packed by
   jdpo's packer into rows of 32,768 tokens (`pack_rows`, best-fit decreasing) and laid out by
   `make_batch`, plain and with the shared prompt; for each row the attention work of each device (the
   key tiles of 64 the blocked kernel visits for its queries: `context_balance.device_work`) under both
   layouts at context 2, 4 and 8; the busiest device over the mean, median / p90 / max over the rows. A
   step waits for its busiest device, so this is the attention part's slowdown against perfect balance.
2. Time per device: each device's share of the attention (the blocked kernel's forward + backward of
   its queries against the whole row, 4 query / 2 kv heads of 64, float32) run alone on one CPU device,
   under both layouts, for a row of T tokens holding one document of 3/4 of the row and one of 1/4, and
   for the first T tokens of a packed row of five of the pairs above (shared prompt). Simulated devices
   on a 2-core CPU share the cores, so a context-split step's time on this machine is the devices' total,
   not the slowest one's as on accelerators: timing each device's share alone is what shows the wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdpo.data.batching import make_batch, pack_rows  # noqa: E402
from jdpo.data.context_balance import BlockBalance, deal_blocks, device_work  # noqa: E402
from jdpo.data.tokenize import TokenizedPairs  # noqa: E402
from jdpo.models import attention  # noqa: E402

ROW = 32768


def long_context_pairs(n: int, seed: int = 0) -> TokenizedPairs:
    rng = np.random.default_rng(seed)

    def lengths(median, sigma, lo, hi):
        return np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi).astype(int)

    p, c, r = lengths(3000, 1.0, 128, 24000), lengths(600, 0.7, 32, 4000), lengths(600, 0.7, 32, 4000)
    ids = lambda k: rng.integers(3, 256, k).astype(np.int32)  # noqa: E731
    return TokenizedPairs([ids(k) for k in p], [ids(k) for k in c], [ids(k) for k in r], np.arange(n))


def work_table(pairs: TokenizedPairs, contexts, block: int) -> list[dict]:
    out = []
    for shared in (False, True):
        lengths = pairs.pair_lengths(shared)
        fits = np.flatnonzero(lengths <= ROW)
        rows = pack_rows(lengths, np.random.default_rng(1).permutation(fits), ROW, 16, 4096)
        batch = make_batch(pairs, rows, ROW, 16, shared_prompt=shared)
        for C in contexts:
            unit = BlockBalance(C, block).unit(ROW)
            ratios = {"chunks": [], "blocks": []}
            for seg in batch.segment_ids:
                w = device_work(seg, C, unit)
                ratios["chunks"].append(w.max() / w.mean())
                order = deal_blocks(seg, C, unit)
                w = device_work(seg[order], C, unit, order)
                ratios["blocks"].append(w.max() / w.mean())
            row = {"shared_prompt": shared, "context": C, "rows": len(rows),
                   "pairs_per_row": len(fits) / len(rows), "block": unit}  # fmt: skip
            for name, xs in ratios.items():
                xs = np.asarray(xs)
                row[name] = {"median": float(np.median(xs)), "p90": float(np.quantile(xs, 0.9)),
                             "max": float(xs.max())}  # fmt: skip
            out.append(row)
            print(
                f"shared prompt {'on ' if shared else 'off'} context {C}: {len(rows)} rows, "
                f"{row['pairs_per_row']:.1f} pairs/row; busiest device / mean: chunks median "
                f"{row['chunks']['median']:.3f} p90 {row['chunks']['p90']:.3f} "
                f"max {row['chunks']['max']:.3f} | "
                f"blocks median {row['blocks']['median']:.3f} p90 {row['blocks']['p90']:.3f} "
                f"max {row['blocks']['max']:.3f}",
                flush=True,
            )
    return out


def unequal_row(T: int) -> np.ndarray:
    """Segment ids [T] of a row holding a document of 3T/4 tokens and one of T/4."""
    return np.concatenate([np.full(3 * T // 4, 1, np.int32), np.full(T // 4, 2, np.int32)])


def shard_slots(seg: np.ndarray, C: int, layout: str, block: int) -> list[np.ndarray]:
    """The natural slots of each device's queries: chunks i and 2C - 1 - i, or the dealt blocks."""
    T = len(seg)
    if layout == "chunks":
        L = T // (2 * C)
        chunk = lambda c: np.arange(c * L, (c + 1) * L)  # noqa: E731
        return [np.concatenate([chunk(i), chunk(2 * C - 1 - i)]) for i in range(C)]
    order = deal_blocks(seg, C, BlockBalance(C, block).unit(T))
    return list(order.reshape(C, -1))


def device_times(seg: np.ndarray, C: int, layout: str, block: int, steps: int) -> list[float]:
    """Each device's attention (the blocked kernel, forward + backward) of its queries against the whole
    row, run alone on one CPU device: what that device computes in a context-split step."""
    T, N, K, H = len(seg), 4, 2, 64
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((1, T, K, H)), jnp.float32) for _ in range(2))
    seg_j = jnp.asarray(seg[None])
    tile = BlockBalance(C, block).unit(T)

    def attend(q, k, v, slots):
        out = attention._local(
            q, k, v, seg_j, None, scale=H**-0.5, softcap=None, block=tile, q_slots=slots
        )
        return jnp.sum(out * out)

    grad = jax.jit(jax.grad(attend, argnums=(0, 1, 2)))
    times = []
    for slots in shard_slots(seg, C, layout, block):
        q = jnp.asarray(rng.standard_normal((1, len(slots), N, H)), jnp.float32)
        s = jnp.asarray(slots, jnp.int32)
        jax.block_until_ready(grad(q, k, v, s))
        runs = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(grad(q, k, v, s))
            runs.append(time.perf_counter() - t0)
        times.append(statistics.median(runs))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--contexts", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--block", type=int, default=64, help="the blocked kernel's tile (model.attention_block)")
    p.add_argument("--length", type=int, default=16384, help="row length of the timed rows")
    p.add_argument("--steps", type=int, default=3, help="timed runs per device (median)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    result = {"work": work_table(long_context_pairs(args.pairs), args.contexts, args.block), "steps": []}
    pairs = long_context_pairs(args.pairs)
    packed = make_batch(pairs, [list(range(5))], ROW, 16, shared_prompt=True).segment_ids[0]
    T = args.length
    rows = {"unequal documents (3/4 + 1/4)": unequal_row(T), "packed long-context pairs": packed[:T]}
    for name, seg in rows.items():
        for C in args.contexts:
            entry = {"row": name, "length": T, "context": C}
            for layout in ("chunks", "blocks"):
                entry[layout] = device_times(seg, C, layout, args.block, args.steps)
            result["steps"].append(entry)
            slow = {k: max(entry[k]) for k in ("chunks", "blocks")}
            mean = {k: statistics.mean(entry[k]) for k in ("chunks", "blocks")}
            print(
                f"{name}, T={T}, context {C}: attention fwd+bwd per device, slowest / mean: chunks "
                f"{slow['chunks']:.3f} s / {mean['chunks']:.3f} s, blocks {slow['blocks']:.3f} s / "
                f"{mean['blocks']:.3f} s; slowest device x{slow['chunks'] / slow['blocks']:.2f} faster "
                "with blocks",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
