"""jdpo.demo: the toy task is verifiable, the tokenizer round-trips, and the demo config runs end to end."""

from __future__ import annotations

import random

import pytest

from jdpo import demo, metrics


def test_task_is_verifiable():
    records = demo.make_records(max_operand=29, seed=3)
    assert len(records) == 30 * 30
    for r in records:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert r["chosen"] == str(a + b)
        assert r["rejected"] != r["chosen"] and int(r["rejected"]) >= 0
    assert len({r["prompt"] for r in records}) == len(records)  # held-out prompts are really unseen
    noisy = demo.noisy_sft_records(records, wrong_fraction=0.5, seed=3)
    wrong = sum(r["chosen"] != str(eval(r["prompt"][:-1])) for r in noisy)  # noqa: S307 (digits and +)
    assert 0.4 < wrong / len(noisy) < 0.6
    rng = random.Random(0)
    assert all(demo.wrong_answer(a, b, rng) != a + b for a in range(20) for b in range(20))


def test_tokenizer_is_character_level_with_bos_and_eos(tmp_path):
    from transformers import AutoTokenizer

    tok = demo.make_tokenizer()
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    ids = back("12+35=")["input_ids"]
    assert ids[0] == back.bos_token_id and len(ids) == 1 + len("12+35=")
    assert back.decode(ids, skip_special_tokens=True) == "12+35="
    assert (
        back("47", add_special_tokens=False)["input_ids"] == tok("47", add_special_tokens=False)["input_ids"]
    )
    assert (back.pad_token_id, back.bos_token_id, back.eos_token_id) == (0, 1, 2)


def test_demo_runs_a_few_steps(tmp_path, capsys):
    summary = demo.run_demo(
        tmp_path / "demo", steps=4, sft_steps=4, max_operand=9, eval_pairs=20,
        model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1}, plot=False,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "before DPO" in printed and "after DPO" in printed
    assert summary["before"]["eval/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert set(summary["after"]) >= {"eval/rewards/accuracies", "eval/rewards/margins", "eval/loss"}
    assert 0.0 <= summary["likelihood_accuracy"]["after"] <= 1.0
    assert (summary["final_dir"] / "config.json").exists()
    assert (tmp_path / "demo" / "sft" / "final" / "model.safetensors").exists()  # the reference
    records = metrics.read_metrics(tmp_path / "demo")
    assert [r["step"] for r in records if "eval/loss" in r][0] == 0 and records[-1]["step"] == 4
