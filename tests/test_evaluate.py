"""jdpo.commands.evaluate: policy == reference gives zeros, numbers equal an independent recomputation, the
side-by-side page, correctness / win rate, and the eval command."""

import json
import math

import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config
from helpers_tokenizer import make_tokenizer

from jdpo.commands import evaluate as E
from jdpo.models import ModelConfig, save_pretrained
from jdpo.scoring.generate import Generator

BETA = 0.1


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(policy dir, reference dir, data JSONL) with two different tiny random llamas (test_generate's)."""
    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer()
    llama = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=320))  # the tokenizer's 300 ids and more
    for name, seed in (("policy", 0), ("reference", 1)):
        save_pretrained(random_model(llama, seed=seed, scale=0.2), root / name, tokenizer=tok)
    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in [(1, 2), (3, 4), (12, 30), (7, 7), (20, 22), (5, 9)]
    ]
    rows.append({"prompt": "hello there", "chosen": " the answer is forty two", "rejected": " the sky"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "policy", root / "reference", root / "data.jsonl"


@nnx.jit
def _forward(model, ids_BxT, segment_ids_BxT):
    return model(ids_BxT, None, segment_ids_BxT)


def _numpy_logps(model, prompt, completion, T=32):
    """Summed log-probs of `completion` after `prompt` from one plain forward (right-padded to T, so one
    compiled program) and a float64 numpy log-softmax."""
    row = np.concatenate([prompt, completion]).astype(np.int32)
    ids, seg = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
    ids[0, : len(row)], seg[0, : len(row)] = row, 1
    logits = np.asarray(_forward(model, ids, seg), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    n = len(prompt)
    return sum(logp[n - 1 + i, t] for i, t in enumerate(completion))


def test_policy_equal_to_reference_gives_zeros(dirs, tmp_path):
    from jdpo.cli import main

    policy, _, data = dirs
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(policy), "--reference", str(policy), "--data", str(data)]
    assert main([*argv, "--num-samples", "4", "--max-new-tokens", "4", "--out-dir", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval/pairs"] == 7 and m["eval/beta"] == BETA  # no run config next to the model: 0.1
    assert m["eval/rewards/accuracies"] == 0.0  # strictly-greater: ties are not "correct"
    assert m["eval/rewards/margins"] == 0.0 and m["eval/rewards/chosen"] == 0.0
    assert m["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["eval/kl"] == 0.0 and m["eval/kl_samples"] == 4
    assert 0.0 < m["eval/distinct_1"] <= 1.0 and 0.0 < m["eval/distinct_2"] <= 1.0
    # Same model, greedy: identical answers, so every checked prompt is a tie.
    assert (
        m["eval/correct/checked"] == 4 and m["eval/correct/ties"] == 4 and m["eval/correct/win_rate"] == 0.5
    )
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["policy"] == r["reference"] for r in rows)


def test_metrics_equal_an_independent_computation(dirs):
    from jdpo import data as jdata

    policy_dir, reference_dir, data = dirs
    policy, reference = Generator.from_pretrained(policy_dir), Generator.from_pretrained(reference_dir)
    report = E.evaluate(policy, reference, str(data), beta=BETA, num_samples=3, max_new_tokens=5)
    m = report["metrics"]

    records = jdata.load_preferences(str(data))
    pairs, _ = jdata.tokenize_preferences(records, policy.tokenizer, max_length=512, max_prompt_length=256)
    pm, rm = policy.model(), reference.model()
    margins, chosen = [], []
    for k in range(len(pairs)):
        p, c, r = pairs.prompt_ids[k], pairs.chosen_ids[k], pairs.rejected_ids[k]
        rc = BETA * (_numpy_logps(pm, p, c) - _numpy_logps(rm, p, c))
        rr = BETA * (_numpy_logps(pm, p, r) - _numpy_logps(rm, p, r))
        margins.append(rc - rr)
        chosen.append(rc)
    margins = np.array(margins)
    assert 0 < (margins > 0).mean() < 1  # two different random models: a non-trivial accuracy
    assert m["eval/rewards/accuracies"] == pytest.approx((margins > 0).mean(), abs=1e-6)
    assert m["eval/rewards/margins"] == pytest.approx(margins.mean(), abs=1e-4)
    assert m["eval/rewards/chosen"] == pytest.approx(np.mean(chosen), abs=1e-4)
    expected_loss = np.mean(np.log1p(np.exp(-margins)))
    assert m["eval/loss"] == pytest.approx(expected_loss, abs=1e-5)
    # The loss of another loss type (a run's own): SLiC's hinge relu(1 - beta z) over the same pairs.
    from jdpo.config import DPOSection

    hinge_loss = DPOSection(loss_type=("hinge",), beta=BETA).loss_spec()
    hinge = E.preference_metrics(policy, reference, pairs, loss=hinge_loss)
    assert hinge["eval/loss"] == pytest.approx(np.mean(np.maximum(0.0, 1.0 - margins)), abs=1e-5)
    assert hinge["eval/rewards/margins"] == pytest.approx(m["eval/rewards/margins"], abs=1e-6)

    # KL: each sample's term is the summed log-ratio of its sampled tokens, recomputed here.
    prompt_ids = policy.encode_prompts(["1+2=", "3+4=", "12+30="])  # the data's first three prompts
    kl_N, completions = E.sample_kl(policy, reference, prompt_ids, max_new_tokens=5)
    for kl, p, c in zip(kl_N, prompt_ids, completions, strict=True):
        assert len(c) >= 1
        assert kl == pytest.approx(_numpy_logps(pm, p, c) - _numpy_logps(rm, p, c), abs=1e-4)
    assert m["eval/kl"] == pytest.approx(kl_N.mean(), abs=1e-9)  # the same prompts, seed and batches
    # Diversity of the same samples, their stop tokens left out.
    from jdpo.report.diversity import distinct_n

    tokens = [E.without_stop(c, policy.stop_ids) for c in completions]
    for n in (1, 2):
        assert m[f"eval/distinct_{n}"] == distinct_n(tokens, n)


def test_side_by_side_page_and_win_rate(dirs, tmp_path):
    policy_dir, reference_dir, _ = dirs
    prompts = ["1+2=", "3+4=", "hello there"]

    def checker(prompt, completion):  # "1+2=" counts as right for both models, text is not checkable
        return (prompt == "1+2=") if prompt[0].isdigit() else None

    cmp = E.compare_generations(
        policy_dir, reference_dir, prompts, checker, out_dir=tmp_path, answers=["3", "7", "?"]
    )
    rows, md = cmp["rows"], (tmp_path / "samples.md").read_text()
    assert [r["prompt"] for r in rows] == prompts
    assert "| # | prompt | reference | policy | answer |" in md
    for i, r in enumerate(rows):
        row_line = next(line for line in md.splitlines() if line.startswith(f"| {i} | "))
        assert E.markdown_cell(r["prompt"]) in row_line and E.markdown_cell(r["reference"]) in row_line
        assert E.markdown_cell(r["policy"]) in row_line
    assert cmp["summary"] == {"checked": 2, "policy_correct": 0.5, "reference_correct": 0.5, "wins": 0,
                              "losses": 0, "ties": 2, "win_rate": 0.5}  # fmt: skip
    assert [r["policy_correct"] for r in rows] == [True, False, None]
    assert "1+2= | " in md and " ✓ |" in md and " ✗ |" in md
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_summary_and_checker():
    rows = [
        {"policy_correct": True, "reference_correct": False},
        {"policy_correct": False, "reference_correct": True},
        {"policy_correct": True, "reference_correct": True},
        {"policy_correct": False, "reference_correct": False},
        {"policy_correct": None, "reference_correct": None},
    ]
    s = E.summarize(rows)
    assert s == {"checked": 4, "policy_correct": 0.5, "reference_correct": 0.5, "wins": 1, "losses": 1,
                 "ties": 2, "win_rate": 0.5}  # fmt: skip
    rows[1]["policy_correct"] = True
    assert E.summarize(rows)["win_rate"] == pytest.approx((1 + 0.5 * 3) / 4)
    assert "reference 50.0% -> policy" in E.format_summary(s)
    assert E.arithmetic_checker("37+45=", "82") is True
    assert E.arithmetic_checker("37+45=", " 82 and more") is True
    assert E.arithmetic_checker("37+45=", "83") is False and E.arithmetic_checker("37+45=", "") is False
    assert (
        E.arithmetic_checker("hello", "82") is None and E.arithmetic_checker([{"role": "user"}], "1") is None
    )
    assert E.markdown_cell("a|b\n<x>") == "a\\|b<br>&lt;x&gt;" and E.markdown_cell("") == "*(empty)*"
    assert E.markdown_cell("a\x1cb\rc") == "a\\x1cb\\x0dc"  # control characters never split a table row


def test_unusable_data_is_one_message_and_exit_2(dirs, tmp_path, capsys):
    from jdpo.cli import main

    policy, reference, _ = dirs
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "1+2=", "chosen": "3", "rejected": "3"}\n' * 2)
    code = main(["eval", "--model", str(policy), "--reference", str(reference), "--data", str(same)])
    err = capsys.readouterr().err
    why = "2 read, dropped {'chosen == rejected': 2}"
    assert code == 2 and err == f"jdpo eval: error: no usable preference pairs in '{same}': {why}\n"


def test_unpaired_data_names_the_eval_option_not_the_train_setting(assets, tmp_path, capsys):
    """Smaller messages of issue 31: jdpo eval on rated (unpaired) records with a pairwise loss names
    its own --loss-type, not the train setting dpo.loss_type."""
    from jdpo.cli import main

    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}", "label": i % 2 == 0})
                            + "\n" for i in range(4)))  # fmt: skip
    model = str(assets.model_dir)
    argv = [
        "eval",
        "--model",
        model,
        "--reference",
        model,
        "--data",
        str(data),
        "--out-dir",
        str(tmp_path / "e"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot be scored with the pairwise loss ['sigmoid']: set --loss-type to kto, bco or" in err
    assert "dpo.loss_type" not in err
