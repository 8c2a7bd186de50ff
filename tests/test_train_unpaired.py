"""Unpaired feedback and WPO in `jdpo train`: the step's first numbers (KTO / APO 0.5, BCO ln 2), TRL's KTO
metric names, cached == online reference, BCO's running mean in the (checkpointed) state with a
bit-identical resume, bco_pair reading it, eval of unpaired runs, WPO weights against a numpy
transcription, and the config / data refusals. The conftest's tiny a+b task (pairs, split into rated
examples here) and model, as in test_train.py."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from helpers import one_device, run_config

from jdpo import config as jconfig
from jdpo.report import metrics
from jdpo.train import trainer as train

KTO_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl",
             "count/chosen", "count/rejected", "rewards/margins", "pairs", "grad_norm",
             "learning_rate"}  # fmt: skip
TIMING = {"step_time", "tokens_per_sec", "mfu"}


def make_config(assets, out, **overrides):
    return run_config(assets, out, **{"train.max_steps": 4, "train.log_every": 1, **overrides})


def steps(trainer, n):
    out = []
    for _ in range(n):
        batch, host = trainer.next_step_batches()
        trainer.state, m = trainer.steps.train_step(trainer.state, batch)
        out.append({k: float(v) for k, v in jax.device_get(m).items() if k != "state_finite"})
    return out


def test_pairs_are_trained_as_rated_examples_with_the_kl_mismatches(assets, tmp_path):
    tr = train.Trainer(make_config(assets, tmp_path / "run", **{"dpo.loss_type": ["kto"]}), mesh=one_device())
    pairs = tr.data.train_pairs
    n_pairs = sum(1 for _ in open(assets.train_path))
    assert len(pairs) == 2 * n_pairs and pairs.labels.sum() == n_pairs  # one desirable, one undesirable each
    for k in range(1, len(pairs)):  # the KL completion of example k is example k-1's completion
        assert pairs.rejected_ids[k].tolist() == pairs.chosen_ids[k - 1].tolist()
    assert pairs.rejected_ids[0].tolist() == pairs.chosen_ids[len(pairs) - 1].tolist()


@pytest.mark.parametrize("loss_type, want", [("kto", 0.5), ("apo_zero_unpaired", 0.5), ("bco", math.log(2))])
def test_first_step_of_the_unpaired_losses(assets, tmp_path, loss_type, want):
    cfg = make_config(assets, tmp_path / "run", **{"dpo.loss_type": [loss_type]})
    tr = train.Trainer(cfg, mesh=one_device())
    (m,) = steps(tr, 1)
    assert m["loss"] == pytest.approx(want, abs=1e-5)  # policy == reference: r = 0, kl = 0, delta = 0
    assert m["count/chosen"] + m["count/rejected"] == m["pairs"] and m["count/chosen"] > 0
    assert abs(m["rewards/chosen"]) < 1e-5 and abs(m["rewards/rejected"]) < 1e-5
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0
    if loss_type == "kto":
        assert KTO_NAMES <= set(m) and "rewards/accuracies" not in m and abs(m["kl"]) < 1e-6
    if loss_type == "bco":
        assert int(tr.state.bco_moments["count"]) == m["pairs"]  # updated with this step's rewards


def test_kto_weights_scale_the_loss_as_the_formula_says(assets, tmp_path):
    over = {"dpo.loss_type": ["kto"], "dpo.desirable_weight": 2.0, "dpo.undesirable_weight": 0.5}
    (m,) = steps(train.Trainer(make_config(assets, tmp_path / "run", **over), mesh=one_device()), 1)
    want = 0.5 * (2.0 * m["count/chosen"] + 0.5 * m["count/rejected"]) / m["pairs"]
    assert m["loss"] == pytest.approx(want, abs=1e-5)


# slow (16 s): the unpaired losses' first steps and references by the tests around it.
@pytest.mark.slow
def test_kto_cached_and_online_reference_agree_and_learn(assets, tmp_path):
    over = {"dpo.loss_type": ["kto"], "dpo.beta": 0.5}
    cached = train.Trainer(make_config(assets, tmp_path / "a", **over), mesh=one_device())
    online = train.Trainer(make_config(assets, tmp_path / "b", **over, **{"dpo.reference": "online"}),
                           mesh=one_device())  # fmt: skip
    a, b = steps(cached, 4), steps(online, 4)
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k
    assert a[-1]["rewards/chosen"] > a[-1]["rewards/rejected"]  # it learns which completions are good
    assert a[-1]["loss"] < a[0]["loss"] and a[-1]["kl"] >= 0
    ev = cached.evaluate()
    assert {"eval/loss", "eval/kl", "eval/rewards/chosen", "eval/count/rejected"} <= set(ev)
    assert ev["eval/count/chosen"] == pytest.approx(cached.data.eval_pairs.labels.sum())
    assert ev == pytest.approx(online.evaluate(), rel=1e-4, abs=1e-5)


def _records(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read_metrics(path)]


@pytest.mark.parametrize("loss_type", ["bco", "bco_pair"])
def test_bco_running_mean_survives_resume_bit_identically(assets, tmp_path, loss_type):
    over = {"dpo.loss_type": [loss_type], "train.max_steps": 4, "train.save_every": 2, "train.eval_every": 2,
            "train.export": False}  # fmt: skip
    full = train.Trainer(make_config(assets, tmp_path / "full", **over), mesh=one_device())
    result_full = full.fit()
    moments = {k: np.asarray(v) for k, v in full.state.bco_moments.items()}
    assert moments["count"] > 0 and moments["mean"] != 0  # the shift moved off its initial 0

    cfg = make_config(assets, tmp_path / "resumed", **over)
    train.run(cfg, callbacks=[lambda m: m["step"] == 2], mesh=one_device())
    second = train.Trainer(cfg, mesh=one_device())
    assert second.restore() == 2 and 0 < int(second.state.bco_moments["count"]) < moments["count"]
    result = second.fit()
    assert _records(result.metrics_path) == _records(result_full.metrics_path)
    for k, v in moments.items():
        np.testing.assert_array_equal(np.asarray(second.state.bco_moments[k]), v)


def test_bco_pair_uses_the_running_mean_of_the_state(assets, tmp_path):
    tr = train.Trainer(make_config(assets, tmp_path / "run", **{"dpo.loss_type": ["bco_pair"]}),
                       mesh=one_device())  # fmt: skip
    steps(tr, 2)
    delta = float(tr.state.bco_moments["mean"])
    assert delta != 0.0
    # The next step's loss is bco_pair at the running mean updated with that step's rewards.
    from jdpo.losses import pairwise as losses
    from jdpo.losses import unpaired as unpaired_losses

    batch, host = tr.next_step_batches()
    logps = tr.logprobs(tr.data.train_pairs)
    ids = np.concatenate([b.pair_ids[b.pair_ids >= 0] for b in host])
    pc, pr = logps.chosen[ids], logps.rejected[ids]
    rc, rr = tr.reference.train.chosen[ids], tr.reference.train.rejected[ids]
    rewards = tr.config.dpo.beta * np.concatenate([pc - rc, pr - rr])
    d = unpaired_losses.running_moments_update(tr.state.bco_moments, rewards)["mean"]
    want, _ = losses.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", beta=tr.config.dpo.beta, bco_delta=d)
    tr.state, m = tr.steps.train_step(tr.state, batch)
    assert float(m["loss"]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_wpo_weights_match_numpy_and_enter_the_loss(assets, tmp_path):
    tr = train.Trainer(make_config(assets, tmp_path / "run", **{"dpo.wpo": True}), mesh=one_device())
    logps = tr.logprobs(tr.data.train_pairs)  # the policy before the step (== the reference)
    batch, host = tr.next_step_batches()
    tr.state, m = tr.steps.train_step(tr.state, batch)
    ids = np.concatenate([b.pair_ids[b.pair_ids >= 0] for b in host])
    # open-instruct's wpo: min(1, exp(mean token log-prob of chosen + mean of rejected)), per pair
    c = logps.chosen[ids].astype(np.float64) / logps.chosen_counts[ids]
    r = logps.rejected[ids].astype(np.float64) / logps.rejected_counts[ids]
    w = np.minimum(1.0, np.exp(c + r))
    assert 0 < w.min() and w.max() < 1  # not all 1: the weights are doing something
    assert float(m["wpo/weight_mean"]) == pytest.approx(w.mean(), rel=1e-4)
    # At step 1 every pair costs ln 2, so the weighted loss is ln 2 * mean(w) (the unweighted: ln 2).
    assert float(m["loss"]) == pytest.approx(math.log(2) * w.mean(), rel=1e-4)


def test_config_refusals(assets, tmp_path):
    def cfg(**over):
        return make_config(assets, tmp_path / "x", **over)

    for over, pattern in [
        ({"dpo.loss_type": ["kto", "sigmoid"]}, "cannot be combined"),
        ({"dpo.loss_type": ["bco"], "dpo.reference": "none"}, "bco needs a reference"),
        ({"dpo.loss_type": ["kto"], "dpo.wpo": True}, "dpo.wpo weights pairs"),
        ({"dpo.loss_type": ["kto"], "dpo.desirable_weight": -1.0}, "dpo.desirable_weight must be >= 0"),
        ({"dpo.loss_type": ["kto"], "train.early_stop_patience": 2}, "early_stop_accuracy watch the eval"),
    ]:
        with pytest.raises(jconfig.ConfigError, match=pattern):
            jconfig.validate(cfg(**over))
    help_names = {row[0] for row in jconfig.field_help()}
    assert {"dpo.desirable_weight", "dpo.undesirable_weight", "dpo.wpo"} <= help_names


def write_unpaired(path, labels):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": bool(x)} for i, x in enumerate(labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_unpaired_data_refusals(assets, tmp_path):
    ones = write_unpaired(tmp_path / "ones.jsonl", [True] * 6)
    over = {"data.train": [ones], "data.eval": []}
    with pytest.raises(ValueError, match=r"ones\.jsonl\): only desirable examples \(6 desirable, 0"):
        train.Trainer(make_config(assets, tmp_path / "a", **over, **{"dpo.loss_type": ["kto"]}),
                      mesh=one_device())  # fmt: skip
    from jdpo.data import DataError

    with pytest.raises(DataError, match=r"ones\.jsonl: unpaired records .* set dpo.loss_type to kto"):
        train.Trainer(make_config(assets, tmp_path / "b", **over), mesh=one_device())


# slow (21 s): jdpo eval by tests/test_evaluate.py, unpaired runs by the tests above.
@pytest.mark.slow
def test_jdpo_eval_of_an_unpaired_run(assets, tmp_path):
    from jdpo.commands import evaluate

    over = {"dpo.loss_type": ["kto"], "train.max_steps": 2, "dpo.beta": 0.5}
    result = train.run(make_config(assets, tmp_path / "run", **over), mesh=one_device())
    kw = dict(num_samples=2, max_new_tokens=3, max_length=16, max_prompt_length=8, mesh=one_device())
    # Pairs: the pairwise reward metrics of the run's implicit reward (preference accuracy).
    paired = evaluate.evaluate(result.final_dir, assets.model_dir, str(assets.eval_path), **kw)["metrics"]
    assert 0 <= paired["eval/rewards/accuracies"] <= 1 and "eval/count/chosen" not in paired
    # Rated examples: the run's own loss and TRL's KTO metrics.
    rated = write_unpaired(tmp_path / "rated.jsonl", [True, False, True, True, False])
    m = evaluate.evaluate(result.final_dir, assets.model_dir, rated, **kw)["metrics"]
    assert m["eval/count/chosen"] == 3 and m["eval/count/rejected"] == 2
    assert m["eval/kto_kl"] >= 0 and math.isfinite(m["eval/loss"]) and "eval/kl" in m  # + the sampled KL


# slow (23 s): KTO's reductions over a sharded mesh (z_0, the eval loss) equal one device's in
# tests/test_context_train.py::test_kto_with_qlora_on_a_context_mesh_equals_one_device (fsdp 2 x context 4).
@pytest.mark.slow
def test_sharded_kto_run_matches_one_device(assets, tmp_path):
    # KTO's z_0 and the per-class means are reductions over the global micro-batch: the same on 8 devices.
    from jdpo.parallel.sharding import make_mesh

    over = {"dpo.loss_type": ["kto"], "dpo.beta": 0.5}
    one = train.Trainer(make_config(assets, tmp_path / "one", **over), mesh=one_device())
    eight = train.Trainer(make_config(assets, tmp_path / "eight", **over), mesh=make_mesh(2, 2, 2))
    for a, b in zip(steps(one, 3), steps(eight, 3), strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert abs(a["rewards/chosen"]) > 1e-3  # the runs moved, so the comparison is not of step-1 zeros


@pytest.mark.parametrize("loss_type", ["kto", "bco"])
def test_one_class_data_is_refused_with_a_message_for_kto_and_bco(assets, tmp_path, capsys, loss_type):
    import json as _json

    from jdpo.cli import main

    data = tmp_path / "thumbs_up.jsonl"
    rows = [{"prompt": f"{i}+1=", "completion": f"{i + 1}", "label": True} for i in range(8)]
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model.path", str(assets.model_dir), "--data.train", str(data),
            "--dpo.loss_type", loss_type, "--train.output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    name = loss_type.upper()
    assert f"data.train ({data}): only desirable examples (8 desirable, 0 undesirable): {name} needs" in err
    assert "apo_zero_unpaired" in err  # the loss that takes one class
    assert not (tmp_path / "run").exists()
