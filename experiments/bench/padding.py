"""Padding of jdpo's packed rows against one pair per row in length buckets and against padding to the
longest sequence in a batch (TRL's DPO collator), on the same hh-rlhf-like lengths (`assets.LENGTHS`'s
hh mix). The README's Padding table:

    python experiments/bench/padding.py [--pairs 20000] [--seed 0]

Packing is `jdpo.data.batching.pack_rows`, the iterator's own; no model or tokenizer is involved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # assets.py
sys.path.insert(0, str(HERE.parents[1]))  # this checkout's jdpo
from assets import synthetic_hh_lengths  # noqa: E402

from jdpo.data.batching import pack_rows  # noqa: E402


def padding_fraction_packed(
    pair_lengths_N: np.ndarray, row_length: int, max_pairs_per_row: int, window: int, seed: int = 0
) -> float:
    """Share of the [rows, T] slots that are padding when the pairs are packed as the iterator does."""
    lengths = np.asarray(pair_lengths_N, np.int64)
    fits = np.flatnonzero(lengths <= row_length)
    order = fits[np.random.default_rng([seed, 0]).permutation(len(fits))]
    rows = pack_rows(lengths, order, row_length, max_pairs_per_row, window)
    return 1.0 - lengths[fits].sum() / (len(rows) * row_length)


def padding_fraction_pad_to_longest(
    chosen_seq_N: np.ndarray, rejected_seq_N: np.ndarray, pairs_per_batch: int, seed: int = 0
) -> float:
    """Share of padding when each batch of pairs is a [2 * pairs, longest sequence] tensor (what TRL's
    DPO collator does: chosen and rejected sequences padded to the longest in the batch)."""
    c, r = np.asarray(chosen_seq_N), np.asarray(rejected_seq_N)
    order = np.random.default_rng([seed, 0]).permutation(len(c))
    real = total = 0
    for i in range(0, len(order), pairs_per_batch):
        ids = order[i : i + pairs_per_batch]
        longest = max(c[ids].max(), r[ids].max())
        real += c[ids].sum() + r[ids].sum()
        total += 2 * len(ids) * longest
    return 1.0 - real / total


def compare_padding(
    prompt_N: np.ndarray,
    chosen_N: np.ndarray,
    rejected_N: np.ndarray,
    *,
    row_length: int = 2048,
    max_pairs_per_row: int = 16,
    pack_window: int = 4096,
    pairs_per_batch: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Padding fraction of our packing, of our one-pair-per-row buckets (row_length / 8, / 4, / 2, / 1),
    and of pad-to-longest (TRL; batches of `pairs_per_batch` pairs), on the same lengths."""
    p, c, r = (np.asarray(x, np.int64) for x in (prompt_N, chosen_N, rejected_N))
    pair = 2 * p + c + r
    buckets = np.asarray([row_length // 8, row_length // 4, row_length // 2, row_length])
    fits = pair <= row_length
    return {
        "packed": padding_fraction_packed(pair, row_length, max_pairs_per_row, pack_window, seed),
        "buckets": 1.0 - pair[fits].sum() / buckets[np.searchsorted(buckets, pair[fits])].sum(),
        "pad_to_longest": padding_fraction_pad_to_longest(p + c, p + r, pairs_per_batch, seed),
    }


def padding_report(n: int = 20000, seed: int = 0) -> None:
    """Print packing vs buckets vs pad-to-longest padding on `n` hh-rlhf-like pairs (the README's table)."""
    p, c, r = synthetic_hh_lengths(n, seed=seed)
    print(f"{n} synthetic hh-rlhf-like pairs; sequence (prompt+completion) median {np.median(p + c):.0f}, "
          f"p99 {np.percentile(p + c, 99):.0f}, max {max((p + c).max(), (p + r).max())}")  # fmt: skip
    for b in (8, 32):
        s = compare_padding(p, c, r, pairs_per_batch=b, seed=seed)
        print(f"pad-to-longest, {b} pairs per batch: padding {s['pad_to_longest']:.1%}")
    for T in (1024, 2048, 4096):
        for P in (8, 16, 32):
            s = compare_padding(p, c, r, row_length=T, max_pairs_per_row=P, seed=seed)
            print(f"T={T} P={P}: packed {s['packed']:.1%}  (one pair per row, buckets: {s['buckets']:.1%})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    padding_report(a.pairs, seed=a.seed)
