"""The batch layout and its sizing rules: pair slots per row, the row length default, the online pair
bound, and the two forms (a BatchLayout or its fields) the iterators take."""

import numpy as np
import pytest

from jdpo.data import PreferenceBatches, TokenizedPairs, make_batch, one_pass
from jdpo.data.layout import (
    MAX_PAIRS_PER_ROW,
    BatchLayout,
    pairs_per_row,
    row_length_for,
    sampled_pair_length,
)


def pairs_of(lengths):
    """Pairs with the given (prompt, chosen, rejected) token counts."""
    ids = lambda n, v: np.full(n, v, np.int32)  # noqa: E731
    p, c, r = zip(*[(ids(a, 5), ids(b, 6), ids(d, 7)) for a, b, d in lengths], strict=True)
    return TokenizedPairs(list(p), list(c), list(r), np.arange(len(lengths)))


def test_pairs_per_row_follows_the_shortest_pair_and_is_capped():
    assert pairs_per_row(100, [np.array([30, 50]), np.array([40])]) == 3  # 100 // 30
    assert pairs_per_row(100, [np.array([200])]) == 1  # never below one slot
    assert pairs_per_row(10_000, [np.array([3])]) == MAX_PAIRS_PER_ROW
    assert pairs_per_row(64, [np.array([], np.int64)]) == 1  # no pairs: one slot
    assert pairs_per_row(64, []) == 1


def test_row_length_default_and_online_pair_bound():
    assert (
        row_length_for(512) == 1024 and row_length_for(512, 0) == 1024 and row_length_for(512, None) == 1024
    )
    assert row_length_for(512, 700) == 700
    assert sampled_pair_length(10, 6) == 32  # 2 x (prompt + new tokens)


def test_for_pairs_sizes_slots_over_every_split_in_the_pairs_layout():
    train, held = pairs_of([(4, 3, 3)] * 3), pairs_of([(2, 1, 1)])
    plain = BatchLayout.for_pairs([train, held], rows_per_batch=2, row_length=60)
    assert plain == BatchLayout(2, 60, 10, True, False)  # shortest pair 2 * 2 + 1 + 1 = 6 tokens
    shared = BatchLayout.for_pairs([train], rows_per_batch=2, row_length=60, shared_prompt=True)
    assert shared.max_pairs_per_row == 60 // (4 + 1 + 3 + 3) and shared.shared_prompt
    assert (
        BatchLayout.for_pairs([train], rows_per_batch=2, row_length=60, packing=False).max_pairs_per_row == 1
    )


def test_fitting_defaults_to_twice_the_longest_sequence():
    pairs = pairs_of([(4, 3, 9), (2, 1, 1)])
    layout = BatchLayout.fitting(pairs, rows_per_batch=4)
    assert layout.row_length == 2 * (4 + 9) and layout.max_pairs_per_row == 26 // 6
    assert BatchLayout.fitting(pairs, rows_per_batch=4, row_length=100).row_length == 100
    assert one_pass(pairs, layout, process_index=0, process_count=1).dropped_too_long == 0


def test_iterators_take_a_layout_or_its_fields_alike():
    pairs = pairs_of([(3, 2, 4), (5, 1, 1), (2, 2, 2), (4, 4, 3)])
    layout = BatchLayout(rows_per_batch=2, row_length=32, max_pairs_per_row=2, shared_prompt=True)
    host = dict(process_index=0, process_count=1)
    a = PreferenceBatches(pairs, layout, seed=3, num_epochs=1, **host)
    b = PreferenceBatches(pairs, rows_per_batch=2, row_length=32, max_pairs_per_row=2, shared_prompt=True,
                          seed=3, num_epochs=1, **host)  # fmt: skip
    assert a.layout == b.layout == layout and a.state() == b.state()
    for x, y in zip(list(a), list(b), strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(TypeError, match="not both"):
        PreferenceBatches(pairs, layout, row_length=64, **host)
    with pytest.raises(TypeError, match="rows_per_batch"):
        one_pass(pairs, row_length=64, **host)


def test_chosen_only_rows_are_single_sequences():
    # What `jdpo eval` scores token by token: prompt + completion in segment 1, nothing of the rejected side.
    pairs = TokenizedPairs([np.array([1, 5, 6], np.int32), np.array([1], np.int32)],
                           [np.array([7, 8, 2], np.int32), np.array([9, 2], np.int32)],
                           [np.zeros(0, np.int32)] * 2, np.arange(2))  # fmt: skip
    batch = make_batch(pairs, [[0], [1], []], 8, 1, chosen_only=True)
    seq = [[1, 5, 6, 7, 8, 2], [1, 9, 2]]
    for b, row in enumerate(seq):
        n = len(row)
        assert batch.input_ids[b].tolist() == row + [0] * (8 - n)
        assert batch.targets[b].tolist() == row[1:] + [0] * (9 - n)
        assert batch.segment_ids[b].tolist() == [1] * n + [0] * (8 - n)
        assert batch.positions[b, :n].tolist() == list(range(n))
    assert batch.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # outputs that predict 7, 8, 2
    assert batch.loss_mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert not batch.input_ids[2].any() and batch.pair_ids[:, 0].tolist() == [0, 1, -1]
