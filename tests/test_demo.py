"""jdpo.demo: the toy task is verifiable, the tokenizer round-trips, and the demo runs end to end (SFT
stages, DPO, the side-by-side comparison of greedy answers)."""

from __future__ import annotations

import json

import pytest

from jdpo import demo
from jdpo.commands.evaluate import arithmetic_checker
from jdpo.report import metrics


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def test_task_is_verifiable():
    records = demo.make_records(max_operand=29, carry_share=0.65, seed=3)
    carry = [r for r in records if demo.has_carry(*_operands(r["prompt"]))]
    assert len(carry) == sum(a % 10 + b % 10 >= 10 for a in range(30) for b in range(30))  # all kept
    assert len(carry) / len(records) == pytest.approx(0.65, abs=0.01)
    assert len({r["prompt"] for r in records}) == len(records)  # held-out prompts are really unseen
    for r in records:
        a, b = _operands(r["prompt"])
        assert r["prompt"] == f"{a:02d}+{b:02d}=" and 0 <= a <= 29 and 0 <= b <= 29
        assert r["chosen"] == f"{a + b:02d}" and arithmetic_checker(r["prompt"], r["chosen"]) is True
        assert arithmetic_checker(r["prompt"], r["rejected"]) is False
        # The rejected answer is exactly the systematic slip: the carry forgotten, or one invented.
        assert int(r["rejected"]) == a + b + (-10 if demo.has_carry(a, b) else 10)
    assert (demo.slip(37, 45), demo.slip(31, 45)) == (72, 86)


def test_sft_data_forgets_the_carry_at_the_slip_rate():
    records = demo.make_records(max_operand=49, seed=1)
    sft = demo.sft_records(records, slip_rate=0.7, seed=1)
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in records]
    slipped = {True: 0, False: 0}
    for r in sft:
        a, b = _operands(r["prompt"])
        right = int(r["chosen"]) == a + b
        assert right or int(r["chosen"]) == demo.slip(a, b)
        assert {r["chosen"], r["rejected"]} == {f"{a + b:02d}", f"{demo.slip(a, b):02d}"}
        slipped[demo.has_carry(a, b)] += not right
    n_carry = sum(demo.has_carry(*_operands(r["prompt"])) for r in sft)
    assert slipped[False] == 0  # sums without a carry are always answered right
    assert 0.65 < slipped[True] / n_carry < 0.75


def test_tokenizer_is_character_level_with_bos_and_eos(tmp_path):
    from transformers import AutoTokenizer

    tok = demo.make_tokenizer()
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    ids = back("12+05=")["input_ids"]
    assert ids[0] == back.bos_token_id and len(ids) == 1 + len("12+05=")
    assert back.decode(ids, skip_special_tokens=True) == "12+05="
    assert (
        back("47", add_special_tokens=False)["input_ids"] == tok("47", add_special_tokens=False)["input_ids"]
    )
    assert len(set(back("0123456789+=", add_special_tokens=False)["input_ids"])) == 12  # one token per char
    assert (back.pad_token_id, back.bos_token_id, back.eos_token_id) == (0, 1, 2)


def test_demo_runs_a_few_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo.run_demo(
        out, steps=4, pretrain_steps=3, sft_steps=3, max_operand=9, eval_pairs=20, compare_prompts=12,
        model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1}, plot=False,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "before DPO" in printed and "after DPO" in printed
    assert "greedy answer correct" in printed and "reference (SFT)" in printed
    assert summary["before"]["eval/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert set(summary["after"]) >= {"eval/rewards/accuracies", "eval/rewards/margins", "eval/loss"}
    assert 0.0 <= summary["likelihood_accuracy"]["after"] <= 1.0
    assert (summary["final_dir"] / "config.json").exists()
    assert (out / "pretrain" / "final" / "model.safetensors").exists()
    assert (out / "sft" / "final" / "model.safetensors").exists()  # the reference

    gens = summary["generations"]
    s = gens["summary"]
    assert s["checked"] == len(gens["rows"]) == 12  # every held-out prompt is checkable
    assert 0.0 <= s["reference_correct"] <= 1.0 and 0.0 <= s["policy_correct"] <= 1.0
    held = [json.loads(line) for line in (out / "assets" / "eval.jsonl").read_text().splitlines()][:12]
    assert [r["prompt"] for r in gens["rows"]] == [r["prompt"] for r in held]  # unseen prompts
    assert [r["answer"] for r in gens["rows"]] == [r["chosen"] for r in held]
    assert gens["paths"]["markdown"] == out / "generations" / "samples.md"
    page = gens["paths"]["markdown"].read_text()
    assert "| prompt | reference | policy |" in page and held[0]["prompt"] in page
    assert len(gens["paths"]["jsonl"].read_text().splitlines()) == 12
    assert sum(r["prompt"] in printed for r in gens["rows"]) == 6  # a few samples side by side

    records = metrics.read_metrics(out)
    assert [r["step"] for r in records if "eval/loss" in r][0] == 0 and records[-1]["step"] == 4
    _check_summary_json(out, "offline", s)


def _check_summary_json(out, recipe: str, gens_summary: dict) -> dict:
    """<out>/summary.json: the schema every recipe writes, and its figures those the demo measured."""
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved) == {"reference", "policy", "recipe", "seconds"} and saved["recipe"] == recipe
    for side in ("reference", "policy"):
        assert set(saved[side]) == {"preference_accuracy", "reward_margin", "greedy_correct",
                                    "likelihood_accuracy"}  # fmt: skip
        assert all(isinstance(v, float) for v in saved[side].values())
        assert saved[side]["greedy_correct"] == gens_summary[f"{side}_correct"]
    assert saved["reference"]["preference_accuracy"] == 0.0  # policy == reference: no strict win
    assert saved["seconds"] > 0
    return saved


def test_the_online_recipe_is_the_presets_dpo_stage_trained_online(assets, tmp_path):
    """`recipe_overrides("online")` on the demo preset: a valid online run scored by `sum_reward`."""
    from jdpo.train import trainer as train

    over = {**demo.recipe_overrides("online"), "model.path": str(assets.model_dir), "train.export": False,
            "logging.console": False, "logging.tensorboard": False, "data.eval": []}  # fmt: skip
    cfg = demo.demo_config(tmp_path, assets, stage="dpo", steps=1, overrides=over)
    assert cfg.dpo.online and cfg.online.reward == "jdpo.demo:sum_reward" and cfg.dpo.beta == 2.0
    result = train.Trainer(cfg).fit()
    assert result.step == 1 and 0.0 <= result.metrics["online/reward_mean"] <= 1.0
    assert demo.recipe_overrides("offline") == {}


# slow (12 s): rounds are covered fast by tests/test_reference_update.py.
@pytest.mark.slow
def test_the_iterative_recipe_is_the_presets_pairs_in_rounds(assets, tmp_path):
    """`recipe_overrides("iterative")` on the demo preset: whole passes, a hard update between them."""
    from jdpo.train import trainer as train

    over = {**demo.recipe_overrides("iterative"), "model.path": str(assets.model_dir), "train.export": False,
            "logging.console": False, "logging.tensorboard": False, "train.rounds": 2,
            "train.log_every": 1}  # fmt: skip
    cfg = demo.demo_config(tmp_path, assets, stage="dpo", overrides=over)
    tr = train.Trainer(cfg)
    assert cfg.train.rounds == 2 and cfg.dpo.reference == "cached" and not cfg.train.max_steps
    result = tr.fit()
    rounds = [r["round"] for r in metrics.read_metrics(result.metrics_path) if "round" in r]
    assert set(rounds) == {1, 2}


# Slow; the online recipe's settings are covered by the test above, summary.json by
# test_demo_runs_a_few_steps (one `write_summary` for every recipe).
@pytest.mark.slow
def test_demo_online_recipe_runs_a_few_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo.run_demo(
        out, steps=2, pretrain_steps=0, sft_steps=1, max_operand=9, eval_pairs=20, compare_prompts=8,
        model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1}, plot=False, recipe="online",
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "stage 2: online DPO for 2 steps" in printed
    _check_summary_json(out, "online", summary["generations"]["summary"])
    records = [r for r in metrics.read_metrics(out) if "online/reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2]  # sampled and scored by jdpo.demo:sum_reward
    assert all(0.0 <= r["online/reward_mean"] <= 1.0 for r in records)
    with pytest.raises(ValueError, match="recipe must be one of offline, online"):
        demo.recipe_overrides("iterated")


def test_sum_reward_is_one_for_the_right_sum():
    assert demo.sum_reward(["12+35=", "12+35=", "12+35=", "x"], ["47", "57", "470", "47"]) == [1, 0, 0, 0]


# Slow; in the default run KTO training is covered by test_train_unpaired and the demo's path by
# test_demo_runs_a_few_steps.
@pytest.mark.slow
def test_demo_with_kto_measures_on_the_held_out_pairs(tmp_path, capsys):
    summary = demo.run_demo(
        tmp_path / "demo", steps=3, pretrain_steps=2, sft_steps=2, max_operand=9, eval_pairs=20,
        compare_prompts=4, model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1}, plot=False,
        loss_type="kto",
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "stage 2: KTO for 3 steps" in printed and "policy (KTO)" in printed
    # Before: policy == reference on the held-out pairs (no reward, no strict win); after: measured there.
    assert summary["before"]["eval/rewards/accuracies"] == 0.0
    assert summary["before"]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert summary["after"]["eval/rewards/accuracies"] > 0.0
    records = metrics.read_metrics(tmp_path / "demo")
    assert any("eval/kl" in r for r in records) and any(
        "count/chosen" in r for r in records
    )  # trained on KTO
