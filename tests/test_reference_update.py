"""A reference that moves (jdpo.train.reference_update): TR-DPO's hard / soft updates (dpo.ref_update), iterative
DPO's rounds (train.rounds), the adaptive beta schedule in the state; each resumed bit for bit.

The runs are conftest's tiny arithmetic task (15 steps an epoch); the rounds use 40 of its pairs
(5 batches of 4 rows an epoch) so that a run of several rounds stays a few steps long."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from helpers import logged_records, one_device, run_config
from helpers import train_steps as steps

from jdpo import config as jconfig
from jdpo.train import step
from jdpo.train import trainer as train
from jdpo.train.beta_schedule import adaptive_beta

LN2 = math.log(2)


def make_config(assets, out, **overrides):
    return run_config(assets, out, **{"train.max_steps": 6, "train.export": False, **overrides})


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "reference, lora",
    # online without LoRA is slow (11 s): online-lora makes the same hard update of an online reference
    [pytest.param("online", False, marks=pytest.mark.slow), ("online", True), ("cached", True)],
    ids=["online", "online-lora", "cached-lora"],
)
def test_a_hard_update_makes_the_next_loss_ln2_again(assets, tmp_path, reference, lora):
    """After a few steps the loss has left ln 2; a hard update makes the policy the reference (online: a
    bit-for-bit copy of the params, with LoRA the adapters; cached: a new cache of the adapters on the
    base) and the next step starts again at ln 2."""
    over = {"dpo.reference": reference, "dpo.ref_update": "hard", "optim.learning_rate": 1e-2}
    if lora:
        over.update({"lora.rank": 4, "lora.alpha": 8.0})
    tr = train.Trainer(make_config(assets, tmp_path / "run", **over), mesh=one_device())
    losses = [m["loss"] for m in steps(tr, 3)]
    assert abs(losses[-1] - LN2) > 1e-4  # 10x (cached) and 100x (online) the tolerance after the update
    if reference == "online":
        before = leaves(tr.state.ref_params)
        tr.update_reference("hard")
        after = leaves(tr.state.ref_params)
        for a, b in zip(after, leaves(tr.state.params), strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        for r, p in zip(
            jax.tree.leaves(tr.state.ref_params), jax.tree.leaves(tr.state.params), strict=True
        ):
            assert r.sharding == p.sharding  # the update's out_shardings: like the params
    else:
        keys = dict(tr.reference.keys)
        tr.update_reference("hard")
        assert all(tr.reference.keys[k] != keys[k] for k in keys) and tr.reference.reused == {
            "train": False,
            "eval": False,
        }
    (m,) = steps(tr, 1)
    assert m["loss"] == pytest.approx(LN2, abs=1e-6 if reference == "online" else 1e-5)
    assert abs(m["rewards/margins"]) < 1e-4


def test_the_soft_update_is_the_formula_bitwise(assets, tmp_path):
    """ref <- alpha * policy + (1 - alpha) * ref, each product rounded to float32 then summed (numpy's
    float32 arithmetic), for alpha 0 (the reference kept), 0.3 and 1 (the policy); on 8 devices, the
    result sharded like the params."""
    from jdpo.parallel.sharding import make_mesh

    cfg = make_config(assets, tmp_path / "run", **{"dpo.reference": "online"})
    tr = train.Trainer(cfg, mesh=make_mesh(2, 2, 2))
    steps(tr, 1)
    policy, ref = leaves(tr.state.params), leaves(tr.state.ref_params)
    assert any(not np.array_equal(p, r) for p, r in zip(policy, ref, strict=True))
    for alpha in (0.0, 0.3, 1.0):
        settings = dataclasses.replace(tr.settings, ref_update_alpha=alpha)
        update = step.compiled_steps(settings).update_reference["soft"]
        new = update(tr.steps.copy_params(tr.state.ref_params), tr.state.params)
        for x, p in zip(jax.tree.leaves(new), jax.tree.leaves(tr.state.params), strict=True):
            assert x.sharding == p.sharding
        assert max(len(x.sharding.device_set) for x in jax.tree.leaves(new)) == 8
        got = leaves(new)
        a, b = np.float32(alpha), np.float32(1.0 - alpha)
        for g, p, r in zip(got, policy, ref, strict=True):
            assert g.dtype == r.dtype == np.float32
            np.testing.assert_array_equal(g, a * p + b * r)
        if alpha == 0.0:
            assert all(np.array_equal(g, r) for g, r in zip(got, ref, strict=True))
        if alpha == 1.0:
            assert all(np.array_equal(g, p) for g, p in zip(got, policy, strict=True))


def test_a_cached_hard_update_recomputes_the_cache_and_trains_on_it(assets, tmp_path):
    """Cached reference, hard update every 2 steps: after step 2 both splits' caches are recomputed from
    the step-2 weights under new keys (new entries beside the initial ones), the step-3 loss is ln 2 again,
    and the new cache holds the step-2 policy's log-probs."""
    over = {"dpo.ref_update": "hard", "dpo.ref_update_every": 2, "train.max_steps": 3,
            "optim.learning_rate": 1e-2}  # fmt: skip
    tr = train.Trainer(make_config(assets, tmp_path / "run", **over), mesh=one_device())
    initial = dict(tr.reference.keys)
    seen = []
    tr.fit(callbacks=[seen.append])
    loss = {r["step"]: r["loss"] for r in seen if "loss" in r}
    assert abs(loss[2] - LN2) > 1e-3 and loss[3] == pytest.approx(LN2, abs=1e-5)
    assert set(tr.reference.keys) == {"train", "eval"} and all(tr.reference.keys[k] != initial[k] for k in initial)
    entries = {p.name for p in (tmp_path / "refcache").iterdir()}
    assert {*initial.values(), *tr.reference.keys.values()} <= entries
    # The new cache is the step-2 policy's: its checkpoint's weights give the same log-probs.
    again = train.Trainer.from_checkpoint(tmp_path / "run" / "checkpoints" / "3", mesh=one_device())
    assert again.reference.keys == tr.reference.keys and again.reference.reused == {"train": True, "eval": True}
    np.testing.assert_array_equal(again.reference.train.chosen, tr.reference.train.chosen)


@pytest.mark.parametrize(
    "over",
    [
        {"dpo.reference": "online", "dpo.ref_update": "soft", "dpo.ref_update_alpha": 0.5,
         "dpo.beta_schedule": "adaptive", "dpo.target_kl": 0.05},
        # slow (11 s): the cached hard update is
        # test_a_cached_hard_update_recomputes_the_cache_and_trains_on_it's,
        # a resume across one the online case's
        pytest.param({"dpo.reference": "cached", "dpo.ref_update": "hard"}, marks=pytest.mark.slow),
    ],
    ids=["online-soft-adaptive-beta", "cached-hard"],
)  # fmt: skip
def test_resume_is_bit_identical_across_a_reference_update(assets, tmp_path, over):
    """Updates after steps 2 and 4; the first run stops at step 3 (after the first update), the resumed
    one restores the moved reference (online: from the checkpoint; cached: the entry the meta names) and
    the beta of the state, and logs what the uninterrupted run logged."""
    over = {**over, "dpo.ref_update_every": 2, "train.save_every": 3, "train.eval_every": 2}
    full = train.run(make_config(assets, tmp_path / "full", **over), mesh=one_device())
    cfg = make_config(assets, tmp_path / "resumed", **over)
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 3], mesh=one_device())
    assert first.stop_reason == "callback" and first.step == 3
    result = train.Trainer(cfg, mesh=one_device()).fit()
    want, got = logged_records(full.metrics_path), logged_records(result.metrics_path)
    assert [r["step"] for r in got] == [r["step"] for r in want] and got == want
    loss = {r["step"]: r["loss"] for r in want if "loss" in r}
    if over["dpo.ref_update"] == "hard":  # steps 3 and 5 start again from policy == reference
        assert [abs(loss[s] - LN2) < 1e-5 for s in range(1, 7)] == [True, False, True, False, True, False]
    else:
        assert "beta" in want[1] and len({r["beta"] for r in want if "beta" in r}) == 6


def test_adaptive_beta_follows_the_controller_in_both_directions(assets, tmp_path):
    """beta in the state: each step's loss uses it (logged as beta) and the next is Ziegler et al.'s rule
    of the step's KL estimate (ref_kl). At step 1 (policy == reference) the estimate is 0, below the
    target: beta falls; then this task's data log-probs rise (estimates far above 1e-4): beta rises.
    (Its checkpointing is the resume test's.)"""
    target = 1e-4
    over = {"dpo.beta_schedule": "adaptive", "dpo.target_kl": target, "dpo.reference": "online",
            "optim.learning_rate": 1e-2, "train.max_steps": 4, "data.eval": []}  # fmt: skip
    tr = train.Trainer(make_config(assets, tmp_path / "run", **over), mesh=one_device())
    result = tr.fit()
    assert tr.steps.train_step._cache_size() == 1  # beta is state, not a constant: one compiled step
    assert "adaptive beta (target KL 0.0001)" in tr.describe()
    assert float(tr.state.beta) != 0.1 and tr.state.beta.dtype == np.float32
    rows = [r for r in logged_records(result.metrics_path) if "loss" in r]
    assert rows[0]["beta"] == pytest.approx(0.1) and abs(rows[0]["ref_kl"]) < 1e-5
    for now, nxt in zip(rows[:-1], rows[1:], strict=True):
        want = adaptive_beta(np.float32(now["beta"]), np.float32(now["ref_kl"]), target, 0.1)
        assert nxt["beta"] == pytest.approx(float(want), rel=1e-6)
    moves = np.sign(np.diff([r["beta"] for r in rows]))
    assert (moves == np.sign([r["ref_kl"] / target - 1 for r in rows[:-1]])).all()
    assert moves[0] < 0 and (moves[1:] > 0).all()


def test_bad_reference_update_settings_are_refused_naming_the_field():
    def refused(match, **over):
        with pytest.raises(jconfig.ConfigError, match=match):
            jconfig.replace(jconfig.Config(), **over)

    refused(r"soft with dpo.reference=cached: .*use dpo.reference online", **{"dpo.ref_update": "soft"})
    refused(r"dpo.ref_update=hard updates the reference, but dpo.reference is none",
            **{"dpo.ref_update": "hard", "dpo.reference": "none", "dpo.loss_type": ["simpo"]})  # fmt: skip
    refused(r"dpo.ref_update_alpha must be in \(0, 1\]", **{"dpo.ref_update": "soft",
            "dpo.reference": "online", "dpo.ref_update_alpha": 0.0})  # fmt: skip
    refused(r"dpo.ref_update_every must be >= 1", **{"dpo.ref_update": "hard", "dpo.ref_update_every": 0})
    refused(r"train.rounds=3 makes each round one pass.*train.max_steps", **{"train.rounds": 3,
            "train.max_steps": 10})  # fmt: skip
    refused(r"train.rounds must be >= 1", **{"train.rounds": 0})
    refused(r"adaptive needs dpo.target_kl > 0", **{"dpo.beta_schedule": "adaptive"})
    refused(r"dpo.beta_gain must be > 0", **{"dpo.beta_schedule": "adaptive", "dpo.target_kl": 1.0,
            "dpo.beta_gain": 0.0})  # fmt: skip
    names = {row[0] for row in jconfig.field_help()}
    assert {"dpo.ref_update", "dpo.ref_update_every", "dpo.ref_update_alpha", "dpo.beta_schedule",
            "dpo.target_kl", "dpo.beta_gain", "train.rounds"} <= names  # fmt: skip


# data.shared_prompt false: the plain layout's rows give the rounds an odd batch count (asserted below).
ROUNDS = {"train.rounds": 3, "train.max_steps": 0, "train.batch_rows": 4, "train.grad_accum": 2,
          "optim.learning_rate": 1e-2, "data.shared_prompt": "false"}  # fmt: skip


def _few_pairs(assets):
    return {"data.train": [f"{assets.train_path}:40"]}


def test_rounds_cover_the_data_once_each_and_no_step_mixes_two(assets, tmp_path):
    """Each round is one pass: its steps hold every pair exactly once, and a round whose batch count is
    odd ends on a step whose second micro-batch is empty rows (the next round's batches wait for it)."""
    tr = train.Trainer(
        make_config(assets, tmp_path / "run", **ROUNDS, **_few_pairs(assets)), mesh=one_device()
    )
    per_round = [tr.data.batches.num_batches(e) for e in range(3)]
    assert any(n % 2 for n in per_round)  # an odd count: the case the empty micro-batches are for
    assert tr.data.total_steps == sum(math.ceil(n / 2) for n in per_round)
    seen: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for _ in range(tr.data.total_steps):
        _, host = tr.next_step_batches()
        ids = np.concatenate([b.pair_ids.ravel() for b in host])
        seen[tr.data.round] += ids[ids >= 0].tolist()
    fits = np.flatnonzero(tr.data.batches.fits).tolist()
    assert {r: sorted(v) for r, v in seen.items()} == {r: fits for r in (1, 2, 3)}
    assert tr.data.round_ended() and tr.data.batches.epoch == 2
    assert "3 rounds (the policy the next round's reference)" in tr.describe()


def test_rounds_make_the_policy_the_reference_and_resume_exactly_across_a_boundary(assets, tmp_path):
    """Iterative DPO with a cached reference: each round starts at ln 2 against a cache of the previous
    round's final weights, metrics carry the round, and a run stopped at a round's last step (after the
    update: its checkpoint names the new cache) resumes to the uninterrupted run's metrics."""
    over = {**ROUNDS, **_few_pairs(assets), "train.eval_every": 1}
    full = train.run(make_config(assets, tmp_path / "full", **over), mesh=one_device())
    want = logged_records(full.metrics_path)
    rows = [r for r in want if "loss" in r]
    rounds = [r["round"] for r in rows]
    assert rounds == sorted(rounds) and set(rounds) == {1, 2, 3} and len(rows) == full.step
    # A round's last step ends its pass: the epoch is then the round number.
    assert [r["epoch"] for r in rows if r["epoch"] == int(r["epoch"])] == [1.0, 2.0, 3.0]
    firsts = [rounds.index(k) for k in (1, 2, 3)]
    for i, r in enumerate(rows):
        assert (abs(r["loss"] - LN2) < 1e-5) == (i in firsts), (i, r["loss"])
    cfg = make_config(assets, tmp_path / "resumed", **over)
    end_of_round_1 = firsts[1]  # the step number (1-based) of round 1's last step
    first = train.run(cfg, callbacks=[lambda m: m["step"] == end_of_round_1], mesh=one_device())
    assert first.step == end_of_round_1
    resumed = train.Trainer(cfg, mesh=one_device())
    result = resumed.fit()
    assert result.step == full.step and logged_records(result.metrics_path) == want


def test_a_resume_whose_updated_cache_is_gone_says_which_entry(assets, tmp_path):
    """The weights a cached reference was updated from are not kept: a resume needs the entry the
    checkpoint names, and says so (naming it) when it is gone instead of training on another reference."""
    import shutil

    from jdpo.models import CheckpointError

    over = {"dpo.ref_update": "hard", "dpo.ref_update_every": 1, "train.max_steps": 3, "data.eval": []}
    cfg = make_config(assets, tmp_path / "run", **over)
    tr = train.Trainer(cfg, mesh=one_device())
    assert tr.fit(callbacks=[lambda m: m["step"] == 1]).step == 1
    gone = tmp_path / "refcache" / tr.reference.keys["train"]
    shutil.rmtree(gone)
    with pytest.raises(CheckpointError, match=rf"train split is the cache entry {gone} .*missing"):
        train.Trainer(cfg, mesh=one_device()).fit()
