"""The bundled demo: a verifiable toy preference task on which DPO visibly changes what a model says.

Task: two-digit sums "37+45=" (operands 0..49, written with two digits: "07+45=", answers "52").
Most prompts (`carry_share`, 65%) need a carry from the ones into the tens column. Every answer is
checkable, and a held-out split of unseen (a, b) pairs measures generalisation, not memorisation.

Everything is built in-process with no network: the data (JSONL), a character-level tokenizer (built
with `tokenizers`, saved as a transformers fast tokenizer with <s>, </s>, <pad>), and a small random
Llama-family model in Hugging Face format (`init_model` + `save_pretrained`). Then, like a real model's
life (pretraining, imperfect demonstrations, preferences):
  0. SFT on the right answers (loss_type "sft", reference "none"): the model learns to add, carries
     included (~97% of held-out sums right);
  1. SFT on a careless teacher's answers, who forgets the carry in `slip_rate` (70%) of the carry sums
     ("37+45=72"). The model picks up the habit: its greedy answer to a carry sum is the slip, with the
     right answer as a close second. Its export is the reference (~40% of held-out sums right);
  2. DPO from that reference (reference "cached"; the settings are experiments/demo.yaml) on pairs whose
     chosen completion is the right sum and whose rejected one is exactly the slip (the carry forgotten;
     on a sum without a carry, one invented);
  3. greedy answers of the reference and of the policy to the held-out prompts, side by side, and how
     often each is right (`jdpo.commands.evaluate.compare_generations`; pages under <output_dir>/generations).
The held-out preference accuracy and reward margins are printed before and after DPO, then one summary.
Two digits everywhere (fixed positions) and a learning rate of 1e-3 are what let the tiny model learn
carries in a few hundred steps (unpadded or at 3e-3 it stalled at ~20% right).

Measured (seed 0, the default; deterministic on one machine, a little different on another processor:
README.md has both): held-out greedy answers 39.2% right (reference) -> 75.2% (policy); carry sums
6% -> 90%, but sums without a carry 100% -> 49%: DPO also lowers the tokens that the right and the
slipped answer share (the ones digit, EOS), and some no-carry answers break. Other seeds give other
figures.

Recipes (`--recipe`, RECIPES): stage 2 above is `offline`, the default. `online` (ONLINE_STAGE) trains
the same reference with `dpo.online` instead: each step samples 4 answers to 16 train prompts from the
current policy, `sum_reward` scores them (1 if right) and a right answer is trained against a wrong one.
Measured (seed 0, this machine, README.md): held-out greedy answers 39.2% -> 84.0% right; carry sums
6% -> 75%, sums without a carry stay at 100% (the policy's own wrong answers are what it pushes down).
Every recipe writes <output_dir>/summary.json (`write_summary`).

    from jdpo.demo import run_demo
    summary = run_demo("runs/demo")       # or: jdpo demo --output-dir runs/demo
    run_demo("runs/online", recipe="online")  # or: jdpo demo --recipe online
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

from jdpo import data as jdata
from jdpo.commands.demo_recipes import RECIPES, recipe_overrides
from jdpo.commands.evaluate import arithmetic_checker, compare_generations
from jdpo.config import load_config, replace
from jdpo.models import ModelConfig, init_model, save_pretrained
from jdpo.report.plot import plot_run
from jdpo.scoring.forward import split_metrics
from jdpo.scoring.generate import SamplingParams
from jdpo.train import trainer as train

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+=")

# The demo's model (~0.64M parameters): small enough to train on 2 CPU cores in a minute or two, big
# enough to learn two-digit addition with carries in several hundred steps.
DEMO_MODEL = dict(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, num_kv_heads=4)

# The two supervised stages that make the reference (the DPO stage is experiments/demo.yaml). A model
# from scratch takes far larger steps than a pretrained one.
PRETRAIN_STAGE = {"optim.learning_rate": 1e-3, "optim.warmup_ratio": 0.05}
SFT_STAGE = {"optim.learning_rate": 1e-3, "optim.warmup_ratio": 0.05}

# The DPO stage with LoRA (`jdpo demo --lora RANK`): adapters on every projection, the SFT model frozen as
# the base and the reference. Adapters start at zero and move only through a rank-r subspace, so they
# take a larger learning rate than full fine-tuning's 1e-4 (as LoRA runs elsewhere do).
LORA_STAGE = {"optim.learning_rate": 1e-3}

# The preference stage's methods (`jdpo demo --recipe`), each the preset's DPO stage plus these settings.
# offline: the fixed pairs (right sum vs the slip); online: every step samples answers to the train
# prompts from the current policy, scores them with `sum_reward` and trains on right vs wrong.
# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------


def has_carry(a: int, b: int) -> bool:
    """Whether a + b carries from the ones into the tens column."""
    return a % 10 + b % 10 >= 10


def slip(a: int, b: int) -> int:
    """The systematic mistake: the sum with the carry forgotten (37+45 -> 72) or, where there is none
    to forget, invented (31+45 -> 86)."""
    return a + b - 10 if has_carry(a, b) else a + b + 10


def make_records(max_operand: int = 49, carry_share: float = 0.65, seed: int = 0) -> list[dict[str, str]]:
    """Prompts "a+b=" with 0 <= a, b <= max_operand; chosen = the sum, rejected = `slip(a, b)`.

    Every carry sum is kept and the sums without a carry are sub-sampled so that a `carry_share` of the
    prompts need a carry (on a uniform grid it is 45%): the careless teacher's slip then matters on most
    prompts. Shuffled; each prompt once."""
    rng = random.Random(seed)
    carry, plain = [], []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            (carry if has_carry(a, b) else plain).append((a, b))
    if 0 < carry_share < 1:
        keep = round(len(carry) * (1 - carry_share) / carry_share)
        plain = rng.sample(plain, min(keep, len(plain)))
    records = [
        {"prompt": f"{a:02d}+{b:02d}=", "chosen": f"{a + b:02d}", "rejected": f"{slip(a, b):02d}"}
        for a, b in carry + plain
    ]
    rng.shuffle(records)
    return records


def sft_records(records: list[dict], slip_rate: float = 0.7, seed: int = 0) -> list[dict]:
    """The supervised stage's data: the same prompts, answered by a teacher who forgets the carry in a
    `slip_rate` of the carry sums (answer and rejected swapped there); sums without a carry are answered
    right. Above 50% the slip is what a model imitating it says; the right answer stays its strong second
    choice, and DPO has to promote it."""
    rng = random.Random(seed + 1)
    out = []
    for r in records:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        if has_carry(a, b) and rng.random() < slip_rate:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        out.append(r)
    return out


def sum_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The online recipe's reward (`online.reward: jdpo.demo:sum_reward`): 1 where the completion's
    leading number is the prompt's sum, else 0 (`jdpo.commands.evaluate.arithmetic_checker`)."""

    return [1.0 if arithmetic_checker(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


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
    train_path: Path  # DPO pairs: chosen = the right sum, rejected = the slip
    eval_path: Path  # held-out DPO pairs (prompts never seen in training)
    sft_path: Path  # supervised data: the train prompts, the carry often forgotten


def build_assets(directory: str | Path, *, max_operand: int = 49, carry_share: float = 0.65,
                 slip_rate: float = 0.7, eval_pairs: int = 250, seed: int = 0,
                 **model_sizes: Any) -> DemoAssets:  # fmt: skip
    """Write the toy task (train / held-out JSONL), the tokenizer and a random model under `directory`."""
    directory = Path(directory)
    records = make_records(max_operand, carry_share, seed)
    held, train = records[:eval_pairs], records[eval_pairs:]
    tokenizer = make_tokenizer()
    return DemoAssets(
        model_dir=make_model_dir(directory / "init", tokenizer, seed=seed, **model_sizes),
        train_path=write_jsonl(train, directory / "train.jsonl"),
        eval_path=write_jsonl(held, directory / "eval.jsonl"),
        sft_path=write_jsonl(sft_records(train, slip_rate, seed=seed), directory / "sft.jsonl"),
    )


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------
# The demo run
# ------------------------------------------------------------------------------------------------


def default_preset() -> str | None:
    """experiments/demo.yaml next to the package (a source checkout), else None (built-in defaults)."""
    candidate = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"
    return str(candidate) if candidate.exists() else None


def demo_config(output_dir: str | Path, assets: DemoAssets, *, stage: str, steps: int | None = None,
                preset: str | None = None, overrides: dict[str, Any] | None = None):  # fmt: skip
    """The Config of one demo stage ("sft" or "dpo"). The `demo` preset (experiments/demo.yaml) is the DPO
    stage; the demo fills in the paths, and for "sft" the supervised loss and `SFT_STAGE`. `steps` (when
    given) and `overrides` (dotted names) win over the preset."""

    cfg = load_config(preset if preset is not None else default_preset())
    out = Path(output_dir)
    paths = {
        "data.eval": [str(assets.eval_path)],
        "dpo.cache_dir": str(out / "refcache"),
    }
    if stage in ("pretrain", "sft"):
        pretrained = out / "pretrain" / "final"
        stage_cfg = {
            "model.path": str(pretrained if stage == "sft" and pretrained.exists() else assets.model_dir),
            "data.train": [str(assets.sft_path if stage == "sft" else assets.train_path)],
            "dpo.loss_type": ["sft"],
            "dpo.reference": "none",
            "train.output_dir": str(out / stage),
            "train.eval_every": 0,
            "train.save_every": 0,
            **(SFT_STAGE if stage == "sft" else PRETRAIN_STAGE),
        }
    elif stage == "dpo":
        stage_cfg = {
            "model.path": str(out / "sft" / "final"),
            "data.train": [str(assets.train_path)],
            "train.output_dir": str(out),
        }
    else:
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    if steps is not None:
        stage_cfg["train.max_steps"] = steps
    if stage != "dpo" or steps is not None:  # the preset's intervals are for its own step count
        n = steps if steps is not None else cfg.train.max_steps
        stage_cfg["train.log_every"] = max(n // 10, 1)
        if stage == "dpo":
            stage_cfg["train.eval_every"] = max(n // 5, 1)
    return replace(cfg, **{**paths, **stage_cfg, **(overrides or {})})


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
    steps: int | None = None,
    pretrain_steps: int = 450,
    sft_steps: int = 200,
    pretrain_overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    seed: int = 0,
    max_operand: int = 49,
    carry_share: float = 0.65,
    slip_rate: float = 0.7,
    eval_pairs: int = 250,
    compare_prompts: int = 250,
    show_samples: int = 6,
    model: dict | None = None,
    sft_overrides: dict[str, Any] | None = None,
    dpo_overrides: dict[str, Any] | None = None,
    loss_type: str | None = None,
    lora_rank: int = 0,
    recipe: str = "offline",
    plot: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Build the toy task and model, run SFT then DPO, and show what changed on held-out prompts.

    `steps` (DPO) defaults to the preset's train.max_steps. `loss_type` replaces the preset's loss (e.g.
    "kto": the pairs split into rated answers, right = desirable, slip = undesirable; before / after are
    then measured on the held-out pairs as for DPO). `lora_rank` > 0: the preference stage trains LoRA
    adapters of that rank (`LORA_STAGE`; alpha 2 * rank) on the frozen SFT model. `recipe` (RECIPES): how
    the preference stage learns (offline: the fixed pairs; online: pairs sampled from the policy each
    step, reward `sum_reward`). Writes <output_dir>/summary.json: {"reference": {...}, "policy": {...},
    "recipe", "seconds"}, each side with preference_accuracy, reward_margin, greedy_correct and
    likelihood_accuracy.

    Returns {"before": eval metrics of the reference (= the DPO policy at step 0), "after": eval metrics
    after DPO, "likelihood_accuracy": {"before", "after"} (fraction of held-out pairs whose chosen
    completion has the higher log-prob), "generations": compare_generations' {"rows", "summary",
    "paths"} (greedy, held-out prompts; summary has "reference_correct" / "policy_correct" fractions),
    "seconds", "summary" (what summary.json holds), "output_dir", "final_dir"}.
    """

    t0 = time.time()
    out = Path(output_dir)
    say = (lambda *a: None) if quiet else print
    assets = build_assets(out / "assets", seed=seed, max_operand=max_operand, carry_share=carry_share,
                          slip_rate=slip_rate, eval_pairs=eval_pairs, **(model or {}))  # fmt: skip
    say(f"[demo] task: {assets.train_path} (+ held-out {assets.eval_path}); model: {assets.model_dir}")

    if pretrain_steps:
        pre_cfg = demo_config(out, assets, stage="pretrain", steps=pretrain_steps, preset=preset,
                              overrides=pretrain_overrides)  # fmt: skip
        say(f"[demo] stage 0: supervised training for {pre_cfg.train.max_steps} steps on right answers "
            "(learns to add)")  # fmt: skip
        train.run(pre_cfg)
    sft_cfg = demo_config(out, assets, stage="sft", steps=sft_steps, preset=preset, overrides=sft_overrides)
    say(f"[demo] stage 1: supervised fine-tuning for {sft_cfg.train.max_steps} steps on answers that forget "
        f"the carry {slip_rate:.0%} of the time (the reference model)")  # fmt: skip
    train.run(sft_cfg)

    dpo_overrides = {**recipe_overrides(recipe), **(dpo_overrides or {})}
    if loss_type is not None:
        dpo_overrides["dpo.loss_type"] = [loss_type]
    if lora_rank:
        lora = {"lora.rank": lora_rank, "lora.alpha": 2.0 * lora_rank, **LORA_STAGE}
        dpo_overrides = {**lora, **dpo_overrides}
    dpo_cfg = demo_config(out, assets, stage="dpo", steps=steps, preset=preset, overrides=dpo_overrides)
    trainer = train.Trainer(dpo_cfg)
    # An unpaired loss (kto, bco, apo_zero_unpaired) trains on the pairs split into rated examples (right
    # answer: desirable, slip: undesirable) and evaluates on them; the demo measures it on the held-out
    # pairs, as DPO: preference accuracy of the implicit reward, and which answer has the higher log-prob.
    held = _HeldOutPairs(trainer) if dpo_cfg.dpo.unpaired else None
    before = held.metrics() if held else trainer.evaluate()
    like_before = likelihood_accuracy(trainer, held.pairs if held else None)
    name = dpo_cfg.dpo.loss_type[0].upper() if dpo_cfg.dpo.unpaired else "DPO"
    if dpo_cfg.lora.rank:
        name += f" LoRA r={dpo_cfg.lora.rank}"
    say(f"[demo] before {name} (held-out): {_summary(before)}; prefers chosen by log-prob: {like_before:.1%}")
    say(
        "[demo]   (policy == reference: every implicit reward is 0, accuracy counts strict wins; chance: 50%)"
    )
    if dpo_cfg.dpo.online:
        on = dpo_cfg.online
        say(f"[demo] stage 2: online {name} for {dpo_cfg.train.max_steps} steps ({on.prompts_per_step} "
            f"prompts a step, {on.samples_per_prompt} sampled answers each, reward 1 if right; chosen: a "
            "right answer, rejected: a wrong one)")  # fmt: skip
    else:
        say(
            f"[demo] stage 2: {name} for {dpo_cfg.train.max_steps} steps (chosen: the right sum; rejected: "
            "the slip)"
        )
    result = trainer.fit()
    after = held.metrics() if held else result.eval_metrics
    like_after = likelihood_accuracy(trainer, held.pairs if held else None)
    say(f"[demo] after {name} (held-out):  {_summary(after)}; prefers chosen by log-prob: {like_after:.1%}")

    held = read_jsonl(assets.eval_path)[:compare_prompts]

    gens = compare_generations(
        result.final_dir,
        out / "sft" / "final",
        [r["prompt"] for r in held],
        arithmetic_checker,
        answers=[r["chosen"] for r in held],
        sampling=SamplingParams(max_new_tokens=6, temperature=0.0),
        out_dir=out / "generations",
        batch_size=len(held) or 1,
        title="jdpo demo: greedy answers on held-out sums, reference (SFT) vs policy (DPO)",
        metrics={k: float(v) for k, v in after.items()},
    )
    seconds = time.time() - t0
    summary = write_summary(out, recipe, before, after, like_before, like_after, gens["summary"], seconds)
    say(_final_summary(before, after, like_before, like_after, gens, show_samples, seconds, name))
    if plot:
        try:
            say(f"[demo] plots: {', '.join(str(p) for p in plot_run(out))}")
        except ImportError as e:  # matplotlib is optional
            say(f"[demo] no plots: {e} (pip install matplotlib)")
    say(f"[demo] policy exported to {result.final_dir}; reference to {out / 'sft' / 'final'}")
    return {
        "before": before,
        "after": after,
        "likelihood_accuracy": {"before": like_before, "after": like_after},
        "generations": gens,
        "seconds": seconds,
        "summary": summary,
        "output_dir": out,
        "final_dir": result.final_dir,
    }


def write_summary(out: Path, recipe: str, before, after, like_before, like_after, gens_summary,
                  seconds: float) -> dict[str, Any]:  # fmt: skip
    """<out>/summary.json: the held-out figures of the reference and of the policy, one recipe's run."""

    def side(ev: dict, likelihood: float, who: str) -> dict[str, float]:
        return {
            "preference_accuracy": float(ev.get("eval/rewards/accuracies", float("nan"))),
            "reward_margin": float(ev.get("eval/rewards/margins", float("nan"))),
            "greedy_correct": float(gens_summary.get(f"{who}_correct", float("nan"))),
            "likelihood_accuracy": float(likelihood),
        }

    summary = {
        "reference": side(before, like_before, "reference"),
        "policy": side(after, like_after, "policy"),
        "recipe": recipe,
        "seconds": float(seconds),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _final_summary(
    before, after, like_before, like_after, gens, show: int, seconds: float, name="DPO"
) -> str:
    """The demo's closing block: preference numbers before / after, greedy correctness, a few samples."""
    s = gens["summary"]
    w = max(18, len(name) + 11)  # the policy column fits "policy (DPO LoRA r=8)"
    acc = "eval/rewards/accuracies"
    margin = "eval/rewards/margins"
    lines = [
        "",
        "=" * 78,
        f"jdpo demo: held-out results ({s.get('checked', 0)} unseen sums), in {seconds:.0f} s",
        "-" * 78,
        f"{'':34}{'reference (SFT)':>18}{f'policy ({name})':>{w}}",
        f"{'preference accuracy (reward)':34}{before.get(acc, 0.0):>18.1%}{after.get(acc, 0.0):>{w}.1%}",
        f"{'reward margin':34}{before.get(margin, 0.0):>+18.3f}{after.get(margin, 0.0):>+{w}.3f}",
        f"{'prefers right answer (log-prob)':34}{like_before:>18.1%}{like_after:>{w}.1%}",
        f"{'greedy answer correct':34}{s.get('reference_correct', 0.0):>18.1%}"
        f"{s.get('policy_correct', 0.0):>{w}.1%}",
        "-" * 78,
    ]
    rows = gens["rows"]
    # Show the interesting rows first: those DPO fixed, then any it broke, then the rest.
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            not (rows[i].get("policy_correct") and not rows[i].get("reference_correct")),
            not (rows[i].get("reference_correct") and not rows[i].get("policy_correct")),
            i,
        ),
    )
    lines.append(f"{'prompt':12}{'right':>8}{'reference':>14}{'policy':>14}")
    for i in order[:show]:
        r = rows[i]
        mark = {True: " ✓", False: " ✗", None: "  "}
        lines.append(
            f"{r['prompt']:12}{r.get('answer', ''):>8}"
            f"{r['reference'] + mark[r.get('reference_correct')]:>14}"
            f"{r['policy'] + mark[r.get('policy_correct')]:>14}"
        )
    if s:
        lines.append(
            f"policy wins {s['wins']}, loses {s['losses']}, ties {s['ties']} (win rate {s['win_rate']:.1%})"
        )
    if gens.get("paths"):
        lines.append(f"side by side: {gens['paths']['markdown']} (+ {gens['paths']['jsonl'].name})")
    lines.append("=" * 78)
    return "\n".join(lines)


def likelihood_accuracy(trainer, pairs=None) -> float:
    """Fraction of held-out pairs (default: the trainer's eval split) whose chosen completion gets the
    higher summed log-prob under the trainer's current policy (what "the model prefers the right answer"
    means without a reference)."""
    logps = trainer.logprobs(trainer.data.eval_pairs if pairs is None else pairs)
    computed = logps.computed
    return float((logps.chosen > logps.rejected)[computed].sum() / max(computed.sum(), 1))


class _HeldOutPairs:
    """The held-out split as pairs for a trainer whose loss is unpaired (its own eval split holds rated
    examples): their reference log-probs are those of the policy before training, taken on creation."""

    def __init__(self, trainer):

        d = trainer.config.data
        records = jdata.load_preferences(list(d.eval), d.format, seed=trainer.config.train.seed)
        self.trainer = trainer
        self.pairs = jdata.tokenize_preferences(records, trainer.tokenizer, max_length=d.max_length,
                                                max_prompt_length=d.max_prompt_length)[0]  # fmt: skip
        self.reference = trainer.logprobs(self.pairs)

    def metrics(self) -> dict[str, float]:
        """Pairwise eval metrics (preference accuracy, margins) of the current policy's implicit reward."""

        loss = self.trainer.config.dpo.loss_spec()
        return split_metrics(self.trainer.logprobs(self.pairs), self.reference, loss)
