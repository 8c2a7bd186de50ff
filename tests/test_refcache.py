"""jdpo.train.refcache: the cached reference log-probs are right, reused for the same key and never for another."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import build_tiny_assets, one_device, tiny_config
from jax.sharding import NamedSharding, PartitionSpec

from jdpo.losses import logprobs
from jdpo.parallel.sharding import make_mesh
from jdpo.scoring.forward import PairLogps
from jdpo.train import refcache, token_cache
from jdpo.train import trainer as train
from jdpo.train.fingerprint import weights_fingerprint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(assets, assets of another seed, a train file one pair shorter): smaller than conftest's `assets`."""
    d = tmp_path_factory.mktemp("refcache_assets")
    a = build_tiny_assets(d, max_operand=9, eval_pairs=20)
    other = build_tiny_assets(d / "other_seed", max_operand=9, eval_pairs=20, seed=1)  # other weights, pairs
    # Same train pairs as `a` but one fewer: changes the train data, not the eval data.
    lines = a.train_path.read_text().splitlines()
    (d / "train_minus_one.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    return a, other, d / "train_minus_one.jsonl"


def trainer(assets, cache_dir, **overrides):
    base = {
        "dpo.cache_dir": str(cache_dir),
        "train.max_steps": 2,
        "train.output_dir": str(cache_dir.parent / "run"),
    }
    return train.Trainer(tiny_config(assets, **{**base, **overrides}), mesh=one_device())


def test_key_changes_with_weights_data_and_lengths_and_is_reused_otherwise(assets, tmp_path):
    a, other, train_minus_one = assets
    cache = tmp_path / "cache"
    first = trainer(a, cache)
    assert first.reference.reused == {"train": False, "eval": False}
    entries = [p.name for p in cache.iterdir() if p.name != token_cache.SUBDIR]  # the tokenised data beside
    assert sorted(entries) == sorted(first.reference.keys.values())
    assert first.data.tokens_reused is False and trainer(a, cache).data.tokens_reused is True

    again = trainer(a, cache)  # a later (or resumed) run: same key, loaded from disk
    assert again.reference.reused == {"train": True, "eval": True} and again.reference.keys == first.reference.keys
    np.testing.assert_array_equal(again.reference.train.chosen, first.reference.train.chosen)

    lengths = trainer(a, cache, **{"data.max_length": 15})
    assert lengths.reference.reused == {"train": False, "eval": False}
    assert set(lengths.reference.keys.values()).isdisjoint(first.reference.keys.values())

    data = trainer(a, cache, **{"data.train": [str(train_minus_one)]})
    assert data.reference.reused == {"train": False, "eval": True}
    assert (
        data.reference.keys["train"] != first.reference.keys["train"] and data.reference.keys["eval"] == first.reference.keys["eval"]
    )

    # Other weights, same pairs (same tokenizer, same eval file): only the weights differ.
    weights = trainer(a, cache, **{"model.path": str(other.model_dir)})
    assert weights.reference.reused == {"train": False, "eval": False}
    assert set(weights.reference.keys.values()).isdisjoint(first.reference.keys.values())
    manifest = json.loads((cache / first.reference.keys["eval"] / refcache.MANIFEST).read_text())
    assert (
        manifest["num_pairs"] == len(first.data.eval_pairs)
        and manifest["ingredients"]["settings"]["split"] == "eval"
    )


def test_cached_logps_equal_an_unpacked_forward(assets, tmp_path):
    a, _, _ = assets
    tr = trainer(a, tmp_path / "cache")
    model = train.nnx.merge(tr.graphdef, tr.state.params)
    logits = jax.jit(lambda ids: model(ids))
    for k in (0, 5, len(tr.data.train_pairs) - 1):
        pair = tr.data.train_pairs[k]
        for name, want_logp, want_n in (
            ("chosen_ids", tr.reference.train.chosen[k], tr.reference.train.chosen_counts[k]),
            ("rejected_ids", tr.reference.train.rejected[k], tr.reference.train.rejected_counts[k]),
        ):
            ids = np.concatenate([pair["prompt_ids"], pair[name]]).astype(np.int32)[None]
            mask = np.zeros(ids.shape, np.float32)
            mask[0, len(pair["prompt_ids"]) - 1 : -1] = 1.0  # logits at t predict token t + 1
            targets = np.concatenate([ids[:, 1:], np.zeros((1, 1), np.int32)], axis=1)
            logp, n = logprobs.sequence_logprobs(logits(ids), targets, mask)
            assert int(n[0]) == want_n == len(pair[name])
            assert float(logp[0]) == pytest.approx(float(want_logp), abs=1e-4)


def test_weights_fingerprint_is_sharding_invariant_and_sensitive():
    x = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7.0
    one = {"w": jax.device_put(x, jax.devices()[0]), "b": jax.numpy.ones((3,), jax.numpy.bfloat16)}
    mesh = make_mesh(1, 8, 1)
    sharded = {"w": jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp"))), "b": one["b"]}
    assert weights_fingerprint(one) == weights_fingerprint(sharded)
    y = x.copy()
    y[17, 3] = np.nextafter(y[17, 3], np.float32(np.inf))  # one ulp in one element
    assert weights_fingerprint({**one, "w": jax.numpy.asarray(y)}) != weights_fingerprint(
        one
    )
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same multiset of values, other positions
    assert weights_fingerprint(
        {**one, "w": jax.numpy.asarray(swapped)}
    ) != weights_fingerprint(one)


def test_lookup_and_save_roundtrip(tmp_path):
    ref = PairLogps(
        chosen=np.asarray([-1.0, -2.0, -3.0, 0.0], np.float32),
        rejected=np.asarray([-4.0, -5.0, -6.0, 0.0], np.float32),
        chosen_counts=np.asarray([1, 2, 3, 0], np.int32),
        rejected_counts=np.asarray([4, 5, 6, 0], np.int32),
        computed=np.asarray([True, True, True, False]),  # pair 3: no batch held it
    )
    got = ref.lookup(np.asarray([[2, -1], [0, 1]], np.int32))
    np.testing.assert_array_equal(got["ref_chosen_logps"], [[-3.0, 0.0], [-1.0, -2.0]])
    np.testing.assert_array_equal(got["ref_rejected_logps"], [[-6.0, 0.0], [-4.0, -5.0]])
    with pytest.raises(ValueError, match=r"no reference log-probs for pairs \[3\]"):
        ref.lookup(np.asarray([[3, 0]], np.int32))
    refcache.save_entry(tmp_path / "k", ref, {"key": "k"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary directory left behind
    back, problem = refcache.load_entry(tmp_path / "k", 4, ref.computed)
    assert problem is None
    for f in ("chosen", "rejected", "chosen_counts", "rejected_counts", "computed"):
        np.testing.assert_array_equal(getattr(back, f), getattr(ref, f))
    # Verification: every way an entry can be wrong is named, and none is used.
    assert "pairs computed" in refcache.load_entry(tmp_path / "k", 4, np.ones(4, bool))[1]
    assert "holds 4 pairs, the split has 5" in refcache.load_entry(tmp_path / "k", 5)[1]
    raw = (tmp_path / "k" / refcache.ARRAYS).read_bytes()
    (tmp_path / "k" / refcache.ARRAYS).write_bytes(raw[: len(raw) // 2])  # truncated
    assert "checksum" in refcache.load_entry(tmp_path / "k", 4)[1]
    manifest = json.loads((tmp_path / "k" / refcache.MANIFEST).read_text())
    import hashlib

    (tmp_path / "k" / refcache.MANIFEST).write_text(
        json.dumps({**manifest, "sha256": hashlib.sha256(raw[: len(raw) // 2]).hexdigest()})
    )
    assert "unreadable (BadZipFile" in refcache.load_entry(tmp_path / "k", 4)[1]


def test_a_stale_or_damaged_entry_is_never_used_and_is_replaced(assets, tmp_path):
    """The issue's case: a run with short rows left pairs out of its cache; a run with the default rows
    must not reuse it (and die with a NaN loss). A truncated or bit-flipped entry of the right key is
    recomputed and replaced on disk, not crashed on (BadZipFile) or silently loaded."""
    a, _, _ = assets
    cache = tmp_path / "cache"
    # One pair longer (23 tokens) than the others (20): rows of 21 leave out that one, not all of them
    # (a split with no pair left is an error of its own).
    data = tmp_path / "train.jsonl"
    data.write_text(
        a.train_path.read_text() + '{"prompt": "1+2=", "chosen": "3 is the sum", "rejected": "4"}\n'
    )
    # The lengths above are those of the plain layout (each completion after its own prompt).
    kw = {"data.train": [str(data)], "train.export": False, "data.shared_prompt": "false"}
    short = trainer(a, cache, **{**kw, "data.row_length": 21})
    assert short.data.batches.dropped_too_long == 1 and not short.reference.train.computed.all()
    full = trainer(a, cache, **kw)
    assert full.reference.reused == {"train": False, "eval": False}  # row settings are in the key
    assert full.reference.train.computed.all()
    assert np.isfinite(full.fit().metrics["loss"])
    entry = cache / full.reference.keys["train"] / refcache.ARRAYS
    good = entry.read_bytes()
    for damage in (good[:100], good[:-40] + bytes(40)):  # truncated; same length, other bytes
        entry.write_bytes(damage)
        again = trainer(a, cache, **kw)
        assert again.reference.reused["train"] is False and again.reference.reused["eval"] is True
        np.testing.assert_array_equal(again.reference.train.chosen, full.reference.train.chosen)
        assert entry.read_bytes() == good  # replaced with a verified entry
        assert sorted(p.name for p in cache.iterdir()) == sorted(
            {*short.reference.keys.values(), *full.reference.keys.values(), token_cache.SUBDIR}
        )  # no temporary or stale directories left behind


def test_key_holds_the_kernel_that_ran_not_the_name_asked(assets, tmp_path, caplog):
    """model.attention=auto is keyed as the kernel it resolves to (blocked with its 64-position tiles on
    a CPU), so auto and blocked share an entry, and another kernel (xla) does not; the run log names the
    kernel and why."""
    import logging

    a, _, _ = assets
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="jdpo.train.trainer"):
        auto = trainer(a, cache)
    assert auto.attention == ("blocked", 64)
    assert "attention kernel: blocked, 64-position tiles (model.attention=auto on cpu)" in caplog.text
    named = trainer(a, cache, **{"model.attention": "blocked", "model.attention_block": 64})
    assert named.reference.reused == {"train": True, "eval": True} and named.reference.keys == auto.reference.keys
    dense = trainer(a, cache, **{"model.attention": "xla"})
    assert dense.reference.reused == {"train": False, "eval": False}
