"""Batching: layout round-trip, segment consistency, padding, determinism, resume, per-host shares."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_batch import unpack_batch

from jdpo.data import PreferenceBatches, TokenizedPairs, one_pass
from jdpo.data.batching import pack_rows

# What every batch of pairs holds (the reference and label fields are absent).
BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask", "pair_ids")


def load_padding_script():
    """experiments/bench/padding.py (the README's Padding table), imported by path."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "padding.py"
    spec = importlib.util.spec_from_file_location("bench_padding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_pairs(n, seed=0, max_prompt=40, max_completion=30):
    """Synthetic tokenised pairs with distinct, recognisable token values (no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    mk = lambda lo, hi: rng.integers(3, 1000, rng.integers(lo, hi + 1)).astype(np.int32)  # noqa: E731
    p = [np.concatenate([[1], mk(0, max_prompt)]).astype(np.int32) for _ in range(n)]
    c = [np.concatenate([mk(1, max_completion), [2]]).astype(np.int32) for _ in range(n)]
    r = [np.concatenate([mk(1, max_completion), [2]]).astype(np.int32) for _ in range(n)]
    return TokenizedPairs(p, c, r, np.arange(n))


def collect(it):
    return [b for b in it]


def check_batch(batch, pairs, T, P, shared_prompt=False):
    """Shapes, dtypes, and per-segment consistency: no information crosses a segment boundary. In the
    shared-prompt layout a pair's prompt but its last token is segment -(k + 1), right before its
    branches, and the branches' positions continue after it."""
    B = batch["input_ids"].shape[0]
    for k in ("input_ids", "positions", "segment_ids", "targets"):
        assert batch[k].shape == (B, T) and batch[k].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].shape == (B, T)
    assert batch["pair_ids"].shape == (B, P) and batch["pair_ids"].dtype == np.int32
    for b in range(B):
        seg, pos, ids, tgt, mask = (
            batch[k][b] for k in ("segment_ids", "positions", "input_ids", "targets", "loss_mask")
        )
        filled = batch["pair_ids"][b] >= 0
        # Filled slots come first; segments 2k+1, 2k+2 exist exactly for filled slots.
        assert not np.any(filled[np.argmin(filled) :]) or filled.all()
        assert set(np.unique(seg[seg > 0]).tolist()) == set(range(1, 2 * int(filled.sum()) + 1))
        pad = seg == 0
        assert not ids[pad].any() and not tgt[pad].any() and not mask[pad].any() and not pos[pad].any()
        assert shared_prompt or not (seg < 0).any()
        for s in np.unique(seg[seg != 0]):
            (idx,) = np.nonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            pid = batch["pair_ids"][b][(s - 1) // 2 if s > 0 else -s - 1]
            prompt_len = len(pairs.prompt_ids[pid])
            shared = shared_prompt and prompt_len > 1
            if s < 0:  # the shared prompt: all but its last token, right before the chosen branch
                assert shared and len(idx) == prompt_len - 1 and seg[idx[-1] + 1] == -2 * s - 1
                assert np.array_equal(ids[idx], pairs.prompt_ids[pid][:-1]) and not mask[idx].any()
            start = prompt_len - 1 if shared and s > 0 else 0
            assert np.array_equal(pos[idx], start + np.arange(len(idx)))  # restart at 0, or continue
            assert np.array_equal(tgt[idx[:-1]], ids[idx[1:]])  # next token within the segment
            assert tgt[idx[-1]] == 0 and mask[idx[-1]] == 0  # nothing predicted across the boundary
            if s > 0:
                # Mask: outputs at [prompt_len - 1, end - 1) predict exactly the completion tokens.
                scored = 0 if shared else prompt_len - 1
                assert np.array_equal(np.nonzero(mask[idx])[0], np.arange(scored, len(idx) - 1))


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_round_trip_and_segment_consistency(shared_prompt):
    pairs = random_pairs(60)
    pairs.prompt_ids[3] = pairs.prompt_ids[3][:1]  # a prompt of BOS alone: nothing to share
    it = PreferenceBatches(
        pairs,
        rows_per_batch=4,
        row_length=256,
        max_pairs_per_row=4,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
        shared_prompt=shared_prompt,
    )
    seen = []
    for batch in it:
        assert set(batch) == set(BATCH_KEYS)
        check_batch(batch, pairs, 256, 4, shared_prompt)
        for item in unpack_batch(batch):
            k = item["pair_id"]
            p, c, r = pairs.prompt_ids[k], pairs.chosen_ids[k], pairs.rejected_ids[k]
            assert np.array_equal(item["chosen"], np.concatenate([p, c]))
            assert np.array_equal(item["rejected"], np.concatenate([p, r]))
            assert np.array_equal(item["chosen_scored"], c) and np.array_equal(item["rejected_scored"], r)
            seen.append(k)
        # A row's tokens are its pairs' lengths in this layout.
        rows_tokens = (batch["segment_ids"] != 0).sum(axis=1)
        lengths = pairs.pair_lengths(shared_prompt)
        slots = batch["pair_ids"]
        assert rows_tokens.tolist() == [int(lengths[row[row >= 0]].sum()) for row in slots]
    assert sorted(seen) == list(range(60))  # every pair exactly once per epoch
    assert it.dropped_too_long == 0
    p, c, r = pairs.lengths()
    saved = 2 * p + c + r - pairs.pair_lengths(shared_prompt)
    assert (saved == (np.maximum(p - 1, 0) if shared_prompt else 0)).all()


def test_one_pass_and_buckets_same_layout():
    pairs = random_pairs(37, seed=1)
    for kwargs, P in (({"packing": True}, 8), ({"packing": False, "buckets": (64, 128, 256)}, 1)):
        batches = collect(
            one_pass(
                pairs,
                rows_per_batch=4,
                row_length=256,
                max_pairs_per_row=8,
                process_index=0,
                process_count=1,
                **kwargs,
            )
        )
        ids = [i for b in batches for i in b["pair_ids"].ravel().tolist() if i >= 0]
        assert sorted(ids) == list(range(37)) and len(ids) == 37
        for b in batches:
            T = b["input_ids"].shape[1]
            check_batch(b, pairs, T, P)
            if not kwargs["packing"]:
                assert T in (64, 128, 256)
                lengths = pairs.pair_lengths()[b["pair_ids"][:, 0][b["pair_ids"][:, 0] >= 0]]
                assert (lengths <= T).all()
    # One pass is in dataset order when packing is off and everything fits the first bucket.
    small = random_pairs(9, seed=2, max_prompt=5, max_completion=5)
    batches = collect(
        one_pass(
            small,
            rows_per_batch=4,
            row_length=64,
            packing=False,
            buckets=(64,),
            process_index=0,
            process_count=1,
        )
    )
    order = [i for b in batches for i in b["pair_ids"][:, 0].tolist()]
    assert order == list(range(9)) + [-1, -1, -1]


def test_too_long_pairs_are_counted_not_split():
    pairs = random_pairs(20, max_prompt=80, max_completion=60)
    it = one_pass(pairs, rows_per_batch=2, row_length=128, process_index=0, process_count=1)
    ids = [i for b in it for i in b["pair_ids"].ravel().tolist() if i >= 0]
    assert it.dropped_too_long == int((pairs.pair_lengths() > 128).sum()) > 0
    assert len(ids) + it.dropped_too_long == 20


def test_padding_fraction_packing_vs_pad_to_longest():
    padding = load_padding_script()
    p, c, r = padding.synthetic_hh_lengths(8000, seed=0)
    stats = padding.compare_padding(
        p, c, r, row_length=2048, max_pairs_per_row=16, pack_window=4096, pairs_per_batch=32
    )
    assert stats["packed"] < 0.10
    assert stats["pad_to_longest"] > 0.3 > stats["packed"] * 3
    assert stats["packed"] < stats["buckets"] < stats["pad_to_longest"]
    # The iterator itself (its last, part-empty batch included) packs as well.
    z = lambda n: np.zeros(n, np.int32)  # noqa: E731
    pairs = TokenizedPairs([z(n) for n in p], [z(n) for n in c], [z(n) for n in r], np.arange(len(p)))
    it = make_iter(pairs, rows_per_batch=64, row_length=2048, max_pairs_per_row=16, pack_window=4096)
    plan = it.plan(0)
    assert 1 - (2 * p + c + r).sum() / (len(plan) * 64 * 2048) < 0.10
    # Packing respects the row length and slot count.
    lengths = 2 * p + c + r
    rows = pack_rows(lengths, np.arange(len(p)), 2048, 16, 4096)
    assert all(sum(lengths[row]) <= 2048 and len(row) <= 16 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(p)))


def make_iter(pairs, **kw):
    args = dict(
        rows_per_batch=4, row_length=256, max_pairs_per_row=4, seed=7, process_index=0, process_count=1
    )
    args.update(kw)
    return PreferenceBatches(pairs, **args)


def as_json(batch):
    return json.dumps({k: v.tolist() for k, v in batch.items()})


@pytest.mark.parametrize("packing", [True, False])
def test_deterministic_order_and_epochs_differ(packing):
    pairs = random_pairs(50, seed=3)
    a = [as_json(next(it)) for it in [make_iter(pairs, packing=packing)] for _ in range(12)]
    b = [as_json(next(it)) for it in [make_iter(pairs, packing=packing)] for _ in range(12)]
    assert a == b
    it = make_iter(pairs, packing=packing)
    epoch0 = [b["pair_ids"].tolist() for b in (next(it) for _ in range(it.num_batches(0)))]
    assert it.state()["epoch"] == 0
    epoch1 = [b["pair_ids"].tolist() for b in (next(it) for _ in range(it.num_batches(1)))]
    assert it.state()["epoch"] == 1 and epoch0 != epoch1
    other_seed = make_iter(pairs, packing=packing, seed=8)
    assert [next(other_seed)["pair_ids"].tolist()] != epoch0[:1]


@pytest.mark.parametrize("packing", [True, False])
def test_resume_from_state_gives_the_same_remaining_batches(packing):
    pairs = random_pairs(50, seed=4)
    it = make_iter(pairs, packing=packing)
    n = it.num_batches(0)
    for _ in range(n + 2):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.state()))  # survives serialisation
    rest = [as_json(next(it)) for _ in range(n)]
    resumed = make_iter(pairs, packing=packing)
    resumed.restore(state)
    assert [as_json(next(resumed)) for _ in range(n)] == rest
    for other in (make_iter(pairs, seed=1), make_iter(pairs, rows_per_batch=8), make_iter(random_pairs(50))):
        with pytest.raises(ValueError, match="another dataset, seed or batch settings"):
            other.restore(state)
    # The plan is global: a run may resume on another number of hosts.
    halves = [make_iter(pairs, packing=packing, process_index=i, process_count=2) for i in range(2)]
    for h in halves:
        h.restore(state)
    first = json.loads(rest[0])
    assert np.concatenate([next(h)["pair_ids"] for h in halves]).tolist() == first["pair_ids"]


def test_finite_epochs_stop():
    pairs = random_pairs(10)
    it = make_iter(pairs, num_epochs=2)
    total = it.num_batches(0) + it.num_batches(1)
    assert len(collect(it)) == total
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("packing", [True, False])
def test_host_shares_partition_the_global_batch(packing):
    pairs = random_pairs(70, seed=5)
    full = make_iter(pairs, rows_per_batch=8, packing=packing)
    hosts = [
        make_iter(pairs, rows_per_batch=8, packing=packing, process_index=i, process_count=4)
        for i in range(4)
    ]
    for _ in range(full.num_batches(0) + 1):
        g = next(full)
        parts = [next(h) for h in hosts]
        assert all(
            h.last_global_pairs == full.last_global_pairs == int((g["pair_ids"] >= 0).sum()) for h in hosts
        )
        for k in BATCH_KEYS:
            assert parts[0][k].shape[0] == 2
            assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k])
    with pytest.raises(ValueError, match="not divisible"):
        make_iter(pairs, rows_per_batch=6, process_index=0, process_count=4)


def test_end_to_end_fixtures_to_batches():
    from pathlib import Path

    from helpers_tokenizer import make_tokenizer

    from jdpo.data import load_preferences, split_eval, tokenize_preferences

    fix = Path(__file__).parent / "fixtures"
    names = ["standard.jsonl", "hh_rlhf.jsonl", "conversational.jsonl", "shp.csv", "oasst1.jsonl"]
    records = load_preferences([str(fix / n) for n in names])
    train, held = split_eval(records, 0.2, seed=0)
    tok = make_tokenizer("chatml")
    pairs, report = tokenize_preferences(train, tok, max_length=96, max_prompt_length=64)
    assert report.pairs_kept == len(train) and len(held) == 3
    it = PreferenceBatches(pairs, rows_per_batch=2, row_length=192, max_pairs_per_row=4, num_epochs=1,
                           process_index=0, process_count=1)  # fmt: skip
    seen = []
    for batch in it:
        check_batch(batch, pairs, 192, 4)
        seen += [item["pair_id"] for item in unpack_batch(batch)]
    assert sorted(seen) == list(range(len(pairs)))
