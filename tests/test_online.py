"""Online DPO (jdpo/train/online.py): reward checks before the model loads, ties, pair choice, one compiled
sampler, exact resume, prompt-only data."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import online_rewards
import pytest
from helpers import TIMING as RUN_TIMING
from helpers import logged_records, one_device, run_config
from helpers_batch import unpack_batch

from jdpo import config as jconfig
from jdpo.report import metrics
from jdpo.train import online
from jdpo.train import trainer as train

TIMING = RUN_TIMING | {online.SAMPLE_TIME, online.TRAIN_TIME}


def online_config(assets, out, reward="online_rewards:length", **overrides):
    base = {
        "dpo.online": True,
        "dpo.reference": "online",
        "online.reward": reward,
        "online.max_new_tokens": 4,
        "online.prompts_per_step": 8,
        "online.samples_per_prompt": 4,
        "train.max_steps": 2,
        "train.export": False,
        "data.eval": [],  # no eval pass (and its compile) unless a test asks for one
    }
    return run_config(assets, out, **{**base, **overrides})


def _records(path):
    return logged_records(path, timing=TIMING)


@pytest.mark.parametrize(
    "reward, message",
    [
        ("no_such_module_xyz:score", r"cannot import no_such_module_xyz \(ModuleNotFoundError"),
        ("online_rewards:missing", "has no attribute 'missing'"),
        ("online_rewards:not_a_function", "is a int, not a function"),
        ("online_rewards:too_few", "returned 2 scores for 3 completions"),
        ("online_rewards:nan_score", "score nan for completion 0.*must be finite"),
        ("online_rewards:text_scores", "item 0 is a str .*expected a number"),
        ("online_rewards:scalar", "returned a float, expected a list of 3 numbers"),
        ("online_rewards:raises", "raised RuntimeError: the verifier is down"),
    ],
)
def test_a_bad_reward_is_refused_before_the_model_loads(assets, tmp_path, monkeypatch, reward, message):
    def no_model(self):
        raise AssertionError("the model loaded before the reward was checked")

    monkeypatch.setattr(train.Trainer, "_load_model", no_model)
    with pytest.raises(jconfig.ConfigError, match=f"online.reward='{reward}'.*{message}"):
        train.Trainer(online_config(assets, tmp_path / "run", reward), mesh=one_device())


# slow (15 s): a non-finite score mid-run is named with the reward and step by the "inf" case below.
@pytest.mark.slow
def test_a_bad_score_during_training_stops_the_run_naming_the_reward_and_step(assets, tmp_path):
    cfg = online_config(assets, tmp_path / "run", "online_rewards:nan_after_the_probe")
    tr = train.Trainer(cfg, mesh=one_device())
    with pytest.raises(jconfig.ConfigError, match=r"online.reward='online_rewards:nan_after_the_probe' "
                       r"\(step 1\): score nan for completion 0"):  # fmt: skip
        tr.fit()


@pytest.mark.parametrize(
    "how, message",
    # exit is slow (15 s): "raise" takes the same path (the reward's exception, caught, checkpoint, named)
    [pytest.param("exit", "raised SystemExit: 0", marks=pytest.mark.slow),
     ("raise", "raised RuntimeError: the verifier is down"),
     ("inf", "score inf for completion 0"), ("hang", "did not return within online.reward_timeout=1 s")],
)  # fmt: skip
def test_a_reward_failing_mid_run_checkpoints_the_last_state_then_names_the_error(
    assets, tmp_path, monkeypatch, how, message
):
    """Issue 31, item 3: a reward that raised SystemExit(0) at step 3 ended the run as a success, with
    nothing saved; one that raised or scored inf stopped it discarding every step (save_every 0); one that
    hung froze it. Now each is a RewardError (an input error: exit 2) naming online.reward and the step,
    raised after the last completed step is checkpointed; each call is bounded by online.reward_timeout."""
    from jdpo.errors import UserError

    monkeypatch.setitem(online_rewards.MISBEHAVE, "how", how)
    limits = {"train.max_steps": 4, "train.save_every": 0, "online.reward_timeout": 1.0}
    cfg = online_config(assets, tmp_path / "run", "online_rewards:misbehaving", **limits)
    tr = train.Trainer(cfg, mesh=one_device())
    want = rf"online.reward='online_rewards:misbehaving' \(step 3\).*{message}.*checkpoint at step 2"
    with pytest.raises(online.RewardError, match=want):
        tr.fit()
    assert issubclass(online.RewardError, UserError)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
    assert train.Trainer(cfg, mesh=one_device()).restore() == 2


def test_sigterm_during_a_hung_reward_checkpoints_and_stops_as_preempted(assets, tmp_path, monkeypatch):
    """SIGTERM while the reward runs (here: it hangs after the signal) stops the run at once with the last
    completed step checkpointed, as a preemption (the CLI's exit 143), however long the reward would take."""
    import time

    monkeypatch.setitem(online_rewards.MISBEHAVE, "how", "sigterm")
    limits = {"train.max_steps": 4, "train.save_every": 0, "online.reward_timeout": 600.0}
    cfg = online_config(assets, tmp_path / "run", "online_rewards:misbehaving", **limits)
    tr = train.Trainer(cfg, mesh=one_device())
    t0 = time.monotonic()
    result = tr.fit()
    assert time.monotonic() - t0 < online_rewards.HANG
    assert result.stop_reason == "sigterm" and result.step == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]


def test_a_reward_from_a_file_path(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompts, completions):\n    return [1.0 for _ in completions]\n")
    fn = online.load_reward(f"{f}:score")
    assert list(online.score(fn, "x", ["a", "b"], ["c", "d"], when="test")) == [1.0, 1.0]
    with pytest.raises(jconfig.ConfigError, match="no file"):
        online.load_reward(f"{tmp_path / 'nope.py'}:score")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dpo.reference": "cached"}, "cannot be cached before training: set dpo.reference online"),
        ({"online.reward": "no_colon"}, "must be 'module:function'"),
        ({"online.samples_per_prompt": 1}, "online.samples_per_prompt must be >= 2"),
        ({"online.temperature": 0.0}, "online.temperature must be > 0"),
        ({"online.top_p": 0.0}, r"online.top_p must be in \(0, 1\]"),
        ({"dpo.loss_type": ["kto"]}, "best-vs-worst pairs: dpo.loss_type kto"),
    ],
)
def test_config_checks(assets, tmp_path, overrides, message):
    with pytest.raises(jconfig.ConfigError, match=message):
        online_config(assets, tmp_path / "run", **overrides)


def test_layout_that_cannot_hold_the_step_is_refused(assets, tmp_path):
    cfg = online_config(assets, tmp_path / "run", **{"online.prompts_per_step": 40})  # 8 rows x 2 slots
    with pytest.raises(jconfig.ConfigError, match="online.prompts_per_step=40 pairs do not fit"):
        train.Trainer(cfg, mesh=one_device())
    cfg = online_config(assets, tmp_path / "run", **{"online.max_new_tokens": 30})
    with pytest.raises(jconfig.ConfigError, match="data.row_length=48 cannot hold one online pair"):
        train.Trainer(cfg, mesh=one_device())


def test_a_constant_reward_ties_every_prompt_and_makes_no_update(assets, tmp_path):
    tr = train.Trainer(online_config(assets, tmp_path / "run", "online_rewards:constant"), mesh=one_device())
    before = jax.device_get(tr.state.params)
    opt_before = jax.device_get(tr.state.opt_state)
    result = tr.fit()
    assert result.step == 2 and result.stop_reason == "completed"
    train_records = [r for r in metrics.read_metrics(result.metrics_path) if online.TIED_FRACTION in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:
        assert r[online.TIED_FRACTION] == 1.0 and r[online.PAIRS] == 0 and r[online.REWARD_MEAN] == 0.5
        assert "loss" not in r and online.REWARD_CHOSEN not in r and r[online.TRAIN_TIME] >= 0
    for was, now in [(before, tr.state.params), (opt_before, tr.state.opt_state)]:
        now = jax.tree.leaves(jax.device_get(now))
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(was), now, strict=True))
    assert int(tr.state.step) == 0  # no optimizer step was taken


def test_the_pair_is_the_best_vs_the_worst_sample(assets, tmp_path):
    cfg = online_config(assets, tmp_path / "run", "online_rewards:recorded")
    tr = train.Trainer(cfg, mesh=one_device())
    online_rewards.CALLS.clear()
    batch, host = tr.next_step_batches()
    (prompts, completions), k = online_rewards.CALLS[-1], cfg.online.samples_per_prompt
    assert len(completions) == 8 * k and batch.input_ids.shape[:2] == (1, 8)
    want, tied = [], 0
    for j in range(8):
        group = completions[j * k : (j + 1) * k]
        assert len(set(prompts[j * k : (j + 1) * k])) == 1  # a prompt's samples are consecutive
        lengths = [len(c) for c in group]
        if max(lengths) == min(lengths):
            tied += 1
            continue
        want.append((prompts[j * k], group[int(np.argmax(lengths))], group[int(np.argmin(lengths))]))
    assert want, "the random policy should give samples of different lengths"
    got = []
    for item in sorted((it for b in host for it in unpack_batch(b)), key=lambda it: it["pair_id"]):
        decode = lambda ids: tr.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        got.append((decode(item["chosen"][: -len(item["chosen_scored"])]), decode(item["chosen_scored"]),
                    decode(item["rejected_scored"])))  # fmt: skip
    assert got == want
    assert tr.data.last[online.TIED_FRACTION] == tied / 8
    assert tr.data.last[online.REWARD_CHOSEN] == np.mean([len(c) for _, c, _ in want])
    assert tr.data.last[online.REWARD_REJECTED] == np.mean([len(r) for _, _, r in want])


def test_prompt_only_data_samples_with_one_compiled_sampler_and_step(assets, tmp_path):
    """Prompts of many lengths, on the 8-device mesh: the sampler pads them to one length, so prefill,
    the decode loop and the train step compile once over the run."""
    from jdpo.scoring.generate import _compiled

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}="} for a, b in [(1, 2), (11, 12), (3, 45), (7, 7), (10, 9), (0, 1)] * 3]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = online_config(assets, tmp_path / "run", **{"data.train": [str(prompts)], "train.max_steps": 2,
                                                     "online.prompts_per_step": 4})  # fmt: skip
    tr = train.Trainer(cfg)
    assert len(tr.data.prompts) == 6  # distinct prompts
    result = tr.fit()  # step 2 samples prompts of epochs 0 and 1: other lengths, the same program
    assert result.step == 2
    gen = tr.data._generator
    prefill, step, loop = _compiled(gen._settings(tr.data.sampling(0), False))
    assert (prefill._cache_size(), loop._cache_size()) == (1, 1)
    assert tr.steps.train_step._cache_size() == 1
    last = result.metrics
    assert {online.REWARD_MEAN, online.TIED_FRACTION, online.COMPLETION_LENGTH, online.SAMPLE_TIME,
            online.TRAIN_TIME, online.DISTINCT_1, "loss", "rewards/accuracies"} <= set(last)  # fmt: skip
    assert 1 <= last[online.COMPLETION_LENGTH] <= 4
    assert "| reward " in metrics.format_progress(2, 2, last)  # on the console line too


def test_prompts_come_from_prompt_files_and_preference_files(assets, tmp_path):
    from jdpo.data import DataError
    from jdpo.demo import read_jsonl

    prompts, wheres, options = online.read_prompts(str(assets.train_path))
    assert options == [{}] * len(prompts)
    assert prompts == [r["prompt"] for r in read_jsonl(assets.train_path)]
    assert wheres[0].endswith("train.jsonl:1")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")  # fmt: skip
    # A text prompt of message completions is a user turn, as training renders it.
    assert online.read_prompts(str(chat))[0] == [[{"role": "user", "content": "hi"}]]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "1+2="}\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: \"prompt\" must be text or a list"):
        online.read_prompts(str(bad))
    assert online.read_prompts(str(bad), skip_bad_rows=True)[0] == ["1+2="]
    twice = online.load_prompts([str(assets.train_path), str(assets.train_path)])[0]
    assert twice == prompts  # distinct prompts, first occurrence kept


# slow (13 s): the sampler's resumable state by test_prompt_order_and_sampler_rng_resume_exactly, resume by
# tests/test_train.py.
@pytest.mark.slow
def test_resume_of_an_online_run_is_bit_identical(assets, tmp_path):
    over = {"train.max_steps": 3, "train.save_every": 2, "train.eval_every": 2,
            "data.eval": [str(assets.eval_path)]}  # fmt: skip
    full = train.run(online_config(assets, tmp_path / "full", **over), mesh=one_device())
    assert full.step == 3
    cfg = online_config(assets, tmp_path / "resumed", **over)
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 2], mesh=one_device())
    assert first.stop_reason == "callback" and first.step == 2
    result = train.Trainer(cfg, mesh=one_device()).fit()
    assert result.step == 3
    want, got = _records(full.metrics_path), _records(result.metrics_path)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want  # samples, rewards, losses: bit-identical
    assert any(online.REWARD_CHOSEN in r for r in got) and result.eval_metrics == full.eval_metrics


def test_prompt_order_and_sampler_rng_resume_exactly():
    a = online.PromptOrder(5, 3, seed=1, layout="x")
    steps = [a.next() for _ in range(4)]
    assert sorted(i for idx, _ in steps[:1] for i in idx) != []
    assert sorted(steps[0][0] + steps[1][0][:2]) == list(range(5))  # an epoch is every prompt once
    b = online.PromptOrder(5, 3, seed=1, layout="x")
    b.next()
    b.next()
    state = json.loads(json.dumps(b.state()))  # as the checkpoint's JSON meta keeps it
    c = online.PromptOrder(5, 3, seed=1, layout="x")
    c.restore(state)
    assert [c.next() for _ in range(2)] == steps[2:]


# slow (13 s): LoRA with an online reference is covered fast by tests/test_lora.py.
@pytest.mark.slow
def test_lora_online_run_trains_against_the_base(assets, tmp_path):
    cfg = online_config(assets, tmp_path / "run", **{"lora.rank": 2, "train.max_steps": 1})
    tr = train.Trainer(cfg, mesh=one_device())
    result = tr.fit()
    assert result.step == 1 and result.metrics["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert np.isfinite(result.metrics[online.REWARD_MEAN])


def test_plan_of_an_online_run_on_prompts_only(assets, tmp_path, capsys):
    from jdpo import cli

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n')
    rc = cli.main(["plan", "--hf-config", str(assets.model_dir / "config.json"), "--device-memory", "h100",
                   "--devices", "1", "--dpo.online", "true", "--dpo.reference", "online",
                   "--online.reward", "online_rewards:length", "--data.train", str(prompts)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "online reference: frozen copy" in out and "reference cache" not in out


# slow (39 s): hard updates are covered fast by test_reference_update.py, online runs by the tests above.
@pytest.mark.slow
def test_an_online_run_with_hard_reference_updates_restarts_at_ln2(assets, tmp_path):
    """TR-DPO on online pairs: after each step's hard update the reference is the policy, so the next
    step's fresh samples start from loss ln 2 again."""
    over = {"dpo.ref_update": "hard", "dpo.ref_update_every": 1, "train.max_steps": 3,
            "optim.learning_rate": 1e-2, "train.log_every": 1}  # fmt: skip
    result = train.Trainer(online_config(assets, tmp_path / "run", **over), mesh=one_device()).fit()
    losses = [r["loss"] for r in metrics.read_metrics(result.metrics_path) if "loss" in r]
    assert len(losses) == 3 and all(loss == pytest.approx(math.log(2), abs=1e-6) for loss in losses)
    still = {**over, "dpo.ref_update": "none", "train.max_steps": 2}
    plain = train.Trainer(online_config(assets, tmp_path / "plain", **still), mesh=one_device()).fit()
    drift = [r["loss"] for r in metrics.read_metrics(plain.metrics_path) if "loss" in r]
    assert drift[1] != pytest.approx(math.log(2), abs=1e-4)  # without updates the reference stays put
