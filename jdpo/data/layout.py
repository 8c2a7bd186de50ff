"""The batch layout: the shape of a step's rows, and the one set of rules that sizes it.

A `BatchLayout` is what the batch iterator (`jdpo.data.batching.PreferenceBatches`, `one_pass`) needs besides
the pairs: global rows per batch, tokens per row (T), pair slots per row (P), packing, and the
shared-prompt layout. Training, the reference pass, in-training eval, `jdpo eval`, online sampling and
the bench all size their rows here, so one split is laid out the same way wherever it is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jdpo.data.context_balance import BlockBalance
from jdpo.data.tokenize import TokenizedPairs

# Slots cost a [B, T, 2P] one-hot in the per-segment sums, so P stays small.
MAX_PAIRS_PER_ROW = 16


def pairs_per_row(row_length: int, pair_lengths: Sequence[np.ndarray]) -> int:
    """P, pair slots per packed row: as many as the shortest pair allows (no more than can ever be
    filled), at most MAX_PAIRS_PER_ROW. `pair_lengths`: tokens per pair of each split laid out."""
    shortest = min((int(x.min()) for x in pair_lengths if len(x)), default=row_length)
    return int(max(1, min(MAX_PAIRS_PER_ROW, row_length // max(shortest, 1))))


def row_length_for(max_length: int, row_length: int | None = None) -> int:
    """T: `row_length` when set (not 0 / None), else 2 * max_length, room for a pair whose sequences
    (prompt + completion) are each up to `max_length` tokens."""
    return int(row_length or 2 * max(int(max_length), 1))


def sampled_pair_length(longest_prompt: int, max_new_tokens: int) -> int:
    """The most tokens a sampled (online) pair can take in a plain row: 2 x (prompt + completion)."""
    return 2 * (int(longest_prompt) + int(max_new_tokens))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How pairs are laid out in a batch (`jdpo.data.batch` has the per-row fields).

    rows_per_batch: GLOBAL rows per batch (every host's together); row_length: T; max_pairs_per_row: P
    (1 without packing); packing: several pairs per row, else one pair per row in length buckets;
    shared_prompt: a pair's prompt once, its two completions as branches after it. balance: rows split
    over the mesh's context axis, dealt to its devices in blocks (`jdpo.data.context_balance`); None:
    each row in its natural order.
    """

    rows_per_batch: int
    row_length: int
    max_pairs_per_row: int = MAX_PAIRS_PER_ROW
    packing: bool = True
    shared_prompt: bool = False
    balance: BlockBalance | None = None

    @classmethod
    def for_pairs(
        cls,
        splits: Sequence[TokenizedPairs],
        *,
        rows_per_batch: int,
        row_length: int,
        packing: bool = True,
        shared_prompt: bool = False,
        balance: BlockBalance | None = None,
    ) -> BatchLayout:
        """The layout for rows of `row_length` tokens that hold the pairs of every split in `splits` (the
        train and eval splits of a run share one P, so their batches have one shape)."""
        lengths = [pairs.pair_lengths(shared_prompt) for pairs in splits]
        P = pairs_per_row(row_length, lengths) if packing else 1
        return cls(rows_per_batch, int(row_length), P, packing, shared_prompt, balance)

    @classmethod
    def fitting(
        cls, pairs: TokenizedPairs, *, rows_per_batch: int, row_length: int | None = None
    ) -> BatchLayout:
        """A plain packed layout for one split on its own (`jdpo eval`): rows of `row_length` tokens, by
        default twice the split's longest sequence, so every pair fits."""
        lp, lc, lr = pairs.lengths()
        longest = int((lp + np.maximum(lc, lr)).max())
        return cls.for_pairs(
            [pairs], rows_per_batch=rows_per_batch, row_length=row_length_for(longest, row_length)
        )

    @classmethod
    def of(cls, layout: BatchLayout | None = None, **fields) -> BatchLayout:
        """`layout`, or one made of its fields given as keywords (None: left out, its default), not both:
        the keyword form of the batch iterators."""
        given = {k: v for k, v in fields.items() if v is not None}
        if layout is None:
            missing = [k for k in ("rows_per_batch", "row_length") if k not in given]
            if missing:
                raise TypeError(f"a batch layout needs {' and '.join(missing)} (or a BatchLayout)")
            return cls(**given)
        if given:
            raise TypeError(f"give a BatchLayout or its fields, not both (got {sorted(given)} as well)")
        return layout
