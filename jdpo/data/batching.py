"""Fixed-shape batches of whole preference pairs: packing, length buckets, a resumable per-host iterator.

`make_batch` lays out rows of pair ids as one `jdpo.data.batch.Batch` of numpy arrays (its fields are in
batch.py), in the plain or the shared-prompt layout; `PreferenceBatches` plans each epoch and yields this
host's rows of every global batch, in a `jdpo.data.layout.BatchLayout`; `one_pass` is one pass in order.

A row holds whole pairs only, so per-pair reductions are row-local. The number of pairs in a batch varies
with packing: normalise by the global count of valid pairs (`pair_ids >= 0`; on the host
`last_global_pairs`), not by a constant. Packing (default) shuffles the pairs by (seed, epoch), packs them
best-fit-decreasing within windows of `pack_window` pairs and shuffles the rows; without packing each row
holds one pair, in length buckets. Every epoch covers every pair once; pairs longer than the row are left
out and counted (`dropped_too_long`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jdpo.data.batch import Batch
from jdpo.data.context_balance import BlockBalance, deal_blocks
from jdpo.data.layout import BatchLayout
from jdpo.data.tokenize import TokenizedPairs

# ----------------------------------------------------------------------------------------------------
# Packing


def pack_rows(
    lengths_N: np.ndarray, order: Sequence[int], row_length: int, max_pairs_per_row: int, window: int
) -> list[list[int]]:
    """Best-fit-decreasing bin packing of pairs into rows, window by window.

    Args:
      lengths_N: tokens per pair (`TokenizedPairs.pair_lengths` of the layout), all <= row_length.
      order: the pair ids to pack, in (shuffled) order; cut into windows of `window` pairs.
    Returns rows as lists of pair ids. Within a window the pairs are placed longest first into the row
    whose free space fits most tightly (a sorted list + bisect: O(n log n) per window in practice).
    Windows keep packing varied across epochs and memory bounded; rows do not span windows.
    """
    rows: list[list[int]] = []
    order = np.asarray(order, dtype=np.int64)
    for start in range(0, len(order), window):
        ids = order[start : start + window]
        # Stable sort on -length: ties keep the shuffled order, so packing follows the seed.
        ids = ids[np.argsort(-lengths_N[ids], kind="stable")]
        free: list[tuple[int, int]] = []  # (free tokens, row index) of rows that can take more pairs
        for pid in ids.tolist():
            n = int(lengths_N[pid])
            j = bisect.bisect_left(free, (n, -1))
            if j < len(free):
                space, r = free.pop(j)
            else:
                rows.append([])
                space, r = row_length, len(rows) - 1
            rows[r].append(pid)
            if len(rows[r]) < max_pairs_per_row and space - n > 0:
                bisect.insort(free, (space - n, r))
    return rows


def make_batch(
    pairs: TokenizedPairs,
    rows: Sequence[Sequence[int]],
    row_length: int,
    max_pairs_per_row: int,
    shared_prompt: bool = False,
    *,
    chosen_only: bool = False,
    balance: BlockBalance | None = None,
) -> Batch:
    """Lay out `rows` (lists of pair ids, [] for an empty row) as one fixed-shape batch (layout above).
    Unpaired examples (`pairs.labels` set) are laid out the same way, with their labels per slot.

    `shared_prompt`: slot k's prompt but its last token once, in segment -(k + 1), then the chosen and
    rejected branches (2k + 1, 2k + 2), each the prompt's last token (which scores the first completion
    token) and the completion, at the positions that follow the prompt; each branch sees the prompt
    and itself (`jdpo.models.masks`). Per-segment sums are those of the plain layout, on fewer tokens.
    `chosen_only`: each slot's prompt + chosen alone (segment 2k + 1; `rejected_ids` are not read), rows
    of single sequences for scoring given completions token by token (`jdpo eval`'s sampled KL).
    `balance`: rows split over the mesh's context axis, dealt to its devices in blocks
    (`jdpo.data.context_balance`): the [B, T] fields in the dealt order, `slots` the natural slots."""
    B, T, P = len(rows), row_length, max_pairs_per_row
    input_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    segment_ids = np.zeros((B, T), np.int32)
    targets = np.zeros((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    pair_ids = np.full((B, P), -1, np.int32)
    labels = None if pairs.labels is None else np.zeros((B, P), np.int32)

    def place(b, t, s, tokens, position, scored_from):
        """Segment s at row b from t: its tokens, positions from `position`, targets shifted within the
        segment (its last token predicts nothing), scored from output `scored_from` on. Returns the end."""
        n = len(tokens)
        if t + n > T:
            raise ValueError(f"pairs {list(rows[b])} do not fit in a row of {T} tokens")
        input_ids[b, t : t + n] = tokens
        positions[b, t : t + n] = position + np.arange(n, dtype=np.int32)
        segment_ids[b, t : t + n] = s
        targets[b, t : t + n - 1] = input_ids[b, t + 1 : t + n]
        loss_mask[b, t + scored_from : t + n - 1] = 1.0
        return t + n

    for b, row in enumerate(rows):
        if len(row) > P:
            raise ValueError(f"row {b} holds {len(row)} pairs, more than max_pairs_per_row={P}")
        t = 0
        for k, pid in enumerate(row):
            pair_ids[b, k] = pid
            if labels is not None:
                labels[b, k] = int(pairs.labels[pid])
            prompt, offset = pairs.prompt_ids[pid], 0
            if shared_prompt and len(prompt) > 1:
                t = place(b, t, -(k + 1), prompt[:-1], 0, len(prompt) - 1)  # nothing scored
                prompt, offset = prompt[-1:], len(prompt) - 1
            sides = [(2 * k + 1, pairs.chosen_ids[pid])]
            if not chosen_only:
                sides.append((2 * k + 2, pairs.rejected_ids[pid]))
            for s, completion in sides:
                # Output at t scores token t+1: the completion's tokens follow the prompt's.
                tokens = np.concatenate([prompt, completion])
                t = place(b, t, s, tokens, offset, max(len(prompt) - 1, 0))
    slots, unit = None, None if balance is None else balance.unit(T)
    if unit is not None:
        slots = np.stack([deal_blocks(row, balance.devices, unit) for row in segment_ids]).reshape(B, T)
        fields = (input_ids, positions, segment_ids, targets, loss_mask)
        dealt = (np.take_along_axis(x, slots, axis=1) for x in fields)
        input_ids, positions, segment_ids, targets, loss_mask = dealt
    return Batch(
        input_ids=input_ids,
        positions=positions,
        segment_ids=segment_ids,
        targets=targets,
        loss_mask=loss_mask,
        pair_ids=pair_ids,
        labels=labels,
        slots=slots,
    )


# ----------------------------------------------------------------------------------------------------
# The iterator


def _default_process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class PreferenceBatches:
    """Endless (or `num_epochs`) iterator over fixed-shape batches; this host's rows only.

    Args:
      pairs: the tokenised dataset; pair_ids index into it.
      layout: a `jdpo.data.layout.BatchLayout`, or its fields as keywords: rows_per_batch (GLOBAL rows
        per step; each of `process_count` hosts gets rows_per_batch / process_count consecutive rows,
        host i: rows [i*L, (i+1)*L)), row_length (T for packing; also the largest bucket when `buckets`
        is not given), max_pairs_per_row (P; S = 2P segments), packing (False: one pair per row in
        length buckets, P = 1), shared_prompt.
      buckets: row lengths for packing=False (default: row_length / 8, / 4, / 2, row_length).
      seed, shuffle: epoch e's order is a permutation drawn from (seed, e); shuffle=False keeps the
        dataset order (used by `one_pass`).
      num_epochs: stop after this many epochs (None: forever).
      pack_window: pairs per packing window.
    Position: `state()` -> {"epoch", "batch", "seed", "layout"}; `restore(state)` continues exactly
    there (the epoch's plan is recomputed deterministically), also with another number of hosts.
    """

    def __init__(
        self,
        pairs: TokenizedPairs,
        layout: BatchLayout | None = None,
        *,
        rows_per_batch: int | None = None,
        row_length: int | None = None,
        max_pairs_per_row: int | None = None,
        packing: bool | None = None,
        shared_prompt: bool | None = None,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        pack_window: int = 4096,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        layout = BatchLayout.of(layout, rows_per_batch=rows_per_batch, row_length=row_length,
                                max_pairs_per_row=max_pairs_per_row, packing=packing,
                                shared_prompt=shared_prompt)  # fmt: skip
        rows_per_batch, row_length, packing = layout.rows_per_batch, layout.row_length, layout.packing
        if process_index is None or process_count is None:
            pi, pc = _default_process()
            process_index = pi if process_index is None else process_index
            process_count = pc if process_count is None else process_count
        if rows_per_batch % process_count:
            raise ValueError(f"rows_per_batch={rows_per_batch} is not divisible by {process_count} hosts")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside [0, {process_count})")
        self.pairs, self.layout = pairs, layout
        self.rows_per_batch = rows_per_batch
        self.local_rows = rows_per_batch // process_count
        self.process_index, self.process_count = process_index, process_count
        self.packing = packing
        self.max_pairs_per_row = layout.max_pairs_per_row if packing else 1
        if packing:
            self.buckets = (int(row_length),)
        else:
            default = [max(row_length // d, 1) for d in (8, 4, 2, 1)]
            self.buckets = tuple(sorted({int(b) for b in (buckets or default)}))
        self.row_length = self.buckets[-1]
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.pack_window = pack_window
        self.shared_prompt = layout.shared_prompt
        self.lengths_N = pairs.pair_lengths(self.shared_prompt)
        fits = self.lengths_N <= self.row_length
        self.dropped_too_long = int((~fits).sum())
        self.fits = fits  # [N] bool: the pairs a batch can hold (the others are left out everywhere)
        self._fit_ids = np.flatnonzero(fits)
        self.epoch, self.batch = 0, 0
        self.last_global_pairs = 0  # pairs in the whole global batch last returned (all hosts)
        self._plan_epoch: int | None = None
        self._plan: list[tuple[int, list[list[int]]]] = []

    # -- planning ------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self._fit_ids
        return self._fit_ids[np.random.default_rng([self.seed, epoch]).permutation(len(self._fit_ids))]

    def _cut(self, T: int, rows: list[list[int]]) -> list[tuple[int, list[list[int]]]]:
        R = self.rows_per_batch
        rows = rows + [[] for _ in range(-len(rows) % R)]
        return [(T, rows[i : i + R]) for i in range(0, len(rows), R)]

    def plan(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        """The epoch's global batches as (row length, rows of pair ids); deterministic in (seed, epoch)."""
        if self._plan_epoch == epoch:
            return self._plan
        order = self._order(epoch)
        if self.packing:
            rows = pack_rows(self.lengths_N, order, self.row_length, self.max_pairs_per_row, self.pack_window)
            if self.shuffle:
                # FFD emits rows longest-first; shuffle so a batch is not all long (or all short) pairs.
                perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))
                rows = [rows[i] for i in perm]
            plan = self._cut(self.row_length, rows)
        else:
            plan = []
            pending: list[list[list[int]]] = [[] for _ in self.buckets]
            which = np.searchsorted(np.asarray(self.buckets), self.lengths_N[order], side="left")
            for pid, k in zip(order.tolist(), which.tolist(), strict=True):
                pending[k].append([pid])
                if len(pending[k]) == self.rows_per_batch:
                    plan.append((self.buckets[k], pending[k]))
                    pending[k] = []
            # Leftovers fit every larger bucket: carry them up so at most one batch is part-empty.
            for k in range(len(self.buckets) - 1):
                carry = pending[k] + pending[k + 1]
                full = len(carry) - len(carry) % self.rows_per_batch
                plan.extend(self._cut(self.buckets[k + 1], carry[:full]))
                pending[k + 1] = carry[full:]
            if pending[-1]:
                plan.extend(self._cut(self.buckets[-1], pending[-1]))
        self._plan_epoch, self._plan = epoch, plan
        return plan

    def num_batches(self, epoch: int | None = None) -> int:
        """Global batches in an epoch (packing can vary it slightly from epoch to epoch)."""
        return len(self.plan(self.epoch if epoch is None else epoch))

    # -- iteration -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not len(self._fit_ids):
            raise StopIteration
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            plan = self.plan(self.epoch)
            if self.batch < len(plan):
                break
            self.epoch, self.batch = self.epoch + 1, 0
        T, rows = plan[self.batch]
        self.batch += 1
        # Every host knows the whole plan, so the global pair count needs no communication.
        self.last_global_pairs = sum(len(row) for row in rows)
        lo = self.process_index * self.local_rows
        return make_batch(
            self.pairs, rows[lo : lo + self.local_rows], T, self.max_pairs_per_row, self.shared_prompt,
            balance=self.layout.balance,
        )  # fmt: skip

    def _layout_hash(self) -> str:
        # Everything that decides the batch plan except the host split: a run may resume on another
        # number of hosts (the plan is global), but not with other data or batch settings.
        settings = (self.pairs.fingerprint(), self.rows_per_batch, self.buckets, self.max_pairs_per_row,
                    self.packing, self.shuffle, self.pack_window)  # fmt: skip
        if self.shared_prompt:  # appended, so the plain layout's hashes (saved positions) stay as they were
            settings += ("shared_prompt",)
        return hashlib.sha256(repr(settings).encode()).hexdigest()[:16]

    def state(self) -> dict[str, int | str]:
        """The position: the next batch to produce, with the seed and a hash of the data and batch
        settings it is valid for. JSON-serialisable."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "layout": self._layout_hash()}

    def restore(self, state: dict[str, int | str]) -> None:
        """Continue from `state()`; refuses a state taken with another seed, dataset or batch settings."""
        if int(state["seed"]) != self.seed or state["layout"] != self._layout_hash():
            raise ValueError(
                f"iterator state {state} was saved for another dataset, seed or batch settings "
                f"(now seed={self.seed}, layout={self._layout_hash()})"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def one_pass(
    pairs: TokenizedPairs,
    layout: BatchLayout | None = None,
    *,
    buckets: Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    **layout_fields: Any,
) -> PreferenceBatches:
    """A finite pass over every pair exactly once in dataset order (reference log-probs, eval), in
    `layout` (or its fields as keywords: rows_per_batch, row_length, ...).

    Same layout as training batches; the last batch is filled with empty rows (pair_ids -1). Pairs
    longer than the row are left out (see `.dropped_too_long`; size the row as >= 2 * max_length).
    """
    return PreferenceBatches(
        pairs,
        BatchLayout.of(layout, **layout_fields),
        buckets=buckets,
        shuffle=False,
        num_epochs=1,
        process_index=process_index,
        process_count=process_count,
    )
