"""Evaluation of a trained policy against its reference: preference metrics, KL on samples, side by side.

    report = evaluate("runs/demo/final", "runs/demo/sft/final", "runs/demo/assets/eval.jsonl",
                      num_samples=32, out_dir="runs/demo/eval")   # or: jdpo eval --model ... --reference ...
    report["metrics"]["eval/rewards/accuracies"], report["metrics"]["eval/kl"]

What is measured:
- Preference accuracy and margins of the implicit reward r = beta * (log p_policy - log p_ref) on every
  held-out pair (one pass over the data through the training path: `jdpo.data` tokenisation and packed
  batches, `refcache.pair_logprobs`, `losses.dpo_loss`): TRL's names with an `eval/` prefix.
- Sequence-level KL(policy || reference), estimated on completions sampled from the policy (temperature
  1, no top-k / top-p, so the samples follow the policy's own distribution): the mean over samples of
  sum_t [log p_policy(y_t | ...) - log p_ref(y_t | ...)] over the sampled tokens (stop token included).
  Unbiased; a single sample's term can be negative, the mean is >= 0 up to noise. Next to it the same
  samples' diversity, distinct-1 / distinct-2 (`jdpo.report.diversity`): a policy collapsing onto a few answers
  shows it there while its KL grows.
- Side-by-side generations (greedy by default) of both models for N prompts, written as JSONL and as a
  Markdown page. With an `answer_checker(prompt, completion) -> bool | None` (None: not checkable), the
  fraction of correct answers of each model and the policy's win rate (wins + ties / 2 over checked
  prompts). `arithmetic_checker` knows the demo task ("a+b=" -> the sum).

`compare_generations` is the side-by-side part on its own (the demo calls it at its end).
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jdpo import data as jdata
from jdpo.config import Config, load_config
from jdpo.data import TokenizedPairs, make_batch, unpaired
from jdpo.data.chat import chat_fields
from jdpo.data.layout import BatchLayout
from jdpo.data.sources import DataError
from jdpo.losses import logprobs
from jdpo.losses.spec import LossSpec
from jdpo.models.hf import CheckpointError
from jdpo.parallel.sharding import batch_sharding, batch_shards, jit_on_mesh, round_rows
from jdpo.report.diversity import diversity_metrics
from jdpo.scoring.forward import over_split, pair_logprobs, split_metrics
from jdpo.scoring.generate import Generator, Prompt, SamplingParams

AnswerChecker = Callable[[Any, str], "bool | None"]

_SUM_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")
_LEADING_INT = re.compile(r"^\s*(-?\d+)")


def arithmetic_checker(prompt: Any, completion: str) -> bool | None:
    """The demo task: for a prompt "a+b=", is the completion's leading integer a + b? None for any other
    prompt (not checkable)."""
    if not isinstance(prompt, str):
        return None
    m = _SUM_PROMPT.match(prompt)
    if m is None:
        return None
    got = _LEADING_INT.match(completion)
    return got is not None and int(got.group(1)) == int(m.group(1)) + int(m.group(2))


# ------------------------------------------------------------------------------------------------
# Teacher-forced log-probs of given completions
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _token_logprobs_fn(graphdef, mesh):

    def fn(params, ids_BxT, targets_BxT, segment_ids_BxT):
        model = nnx.merge(graphdef, params)
        h_BxTxD = model.hidden_states(ids_BxT, None, segment_ids_BxT)
        unembed, vocab_first = model.unembedding_as_stored()
        return logprobs.token_logprobs_from_hidden(
            h_BxTxD,
            unembed,
            targets_BxT,
            vocab_first=vocab_first,
            logit_soft_cap=model.config.final_logit_softcapping,
            row_groups=batch_shards(ids_BxT.shape[0]),
        )

    return jit_on_mesh(fn, mesh)


def completion_logprobs(
    gen: Generator,
    prompt_ids: Sequence[np.ndarray],
    completion_ids: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    length_bucket: int = 16,
) -> list[np.ndarray]:
    """Per-token log-probs (float32, one array per completion) of each completion given its prompt,
    from one full forward (right-padded rows, padding in segment 0 so it is never attended)."""

    fn = _token_logprobs_fn(gen.graphdef, gen.mesh)
    B = round_rows(batch_size, gen.mesh)
    out: list[np.ndarray] = []
    for lo in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[lo : lo + batch_size], completion_ids[lo : lo + batch_size]
        T = max(len(p) + len(c) for p, c in zip(ps, cs, strict=True))
        T = -(-T // length_bucket) * length_bucket
        n = len(ps)
        seqs = TokenizedPairs(list(ps), list(cs), [np.zeros(0, np.int32)] * n, np.arange(n))
        rows = [[b] for b in range(n)] + [[] for _ in range(B - n)]
        batch = make_batch(seqs, rows, T, 1, chosen_only=True)
        args = [batch.input_ids, batch.targets, batch.segment_ids]
        if gen.mesh is not None:
            args = [jax.device_put(a, batch_sharding(gen.mesh)) for a in args]
        logp_BxT = np.asarray(jax.device_get(fn(gen.params, *args)))
        for b, (p, c) in enumerate(zip(ps, cs, strict=True)):
            # Output at position t predicts token t + 1: completion tokens are predicted from len(p) - 1 on.
            out.append(logp_BxT[b, len(p) - 1 : len(p) - 1 + len(c)])
    return out


# ------------------------------------------------------------------------------------------------
# The three parts
# ------------------------------------------------------------------------------------------------


def _as_generator(model, *, mesh=None, chat_template_kwargs=None) -> Generator:
    if isinstance(model, Generator):
        return model
    return Generator.from_pretrained(model, mesh=mesh, chat_template_kwargs=chat_template_kwargs)


def _check_same_architecture(policy: Generator, reference: Generator) -> None:
    if policy.config != reference.config:
        raise CheckpointError(
            "the policy and the reference have different architectures (their config.json differ)"
        )


@functools.lru_cache(maxsize=8)
def _pair_forward(graphdef, mesh):
    """Jitted per-pair log-probs of a packed batch (one program per architecture and mesh, shared by
    the policy and the reference)."""

    return jit_on_mesh(lambda params, batch: pair_logprobs(nnx.merge(graphdef, params), batch), mesh)


def preference_metrics(
    policy: Generator,
    reference: Generator,
    pairs,
    *,
    loss: LossSpec | None = None,
    batch_rows: int = 8,
    row_length: int | None = None,
) -> dict[str, float]:
    """The loss and TRL's reward metrics (eval/ names) of `loss` (a run's `LossSpec`, as
    `DPOSection.loss_spec()` builds it; default: the sigmoid loss at beta 0.1) over every tokenised
    pair (`jdpo.data.TokenizedPairs`), one pass through the training path's forward. Rated examples
    (`pairs.labels` set, `jdpo.data.unpaired`) get the unpaired loss's metrics; pairs under an unpaired
    loss the pairwise reward metrics (`jdpo.scoring.forward.split_metrics`).

    Rewards are beta * (policy - reference) summed completion log-probs; accuracy counts pairs whose
    chosen reward is strictly above the rejected one (so policy == reference gives 0).
    """

    loss = LossSpec() if loss is None else loss
    rows = round_rows(batch_rows, policy.mesh)
    layout = BatchLayout.fitting(pairs, rows_per_batch=rows, row_length=row_length)

    def batches():
        return jdata.one_pass(pairs, layout)

    if batches().dropped_too_long:
        too_long = batches().dropped_too_long
        raise DataError(f"{too_long} pairs are longer than a row of {layout.row_length} tokens")
    logps = {
        name: over_split(
            _pair_forward(gen.graphdef, gen.mesh), gen.params, batches(), len(pairs), mesh=gen.mesh
        )
        for name, gen in (("policy", policy), ("reference", reference))
    }
    out = split_metrics(logps["policy"], logps["reference"], loss, labels=pairs.labels)
    out["eval/pairs"] = len(pairs)
    return out


def sample_kl(
    policy: Generator,
    reference: Generator,
    prompt_ids: Sequence[np.ndarray],
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One completion sampled from the policy (temperature 1, unfiltered) per prompt, and per sample the
    sum over its tokens of log p_policy - log p_ref. Returns (kl_N float64, completion ids)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    completions: list[np.ndarray] = []
    for lo in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[lo : lo + batch_size])
        filled = chunk + [chunk[0]] * (min(batch_size, len(prompt_ids)) - len(chunk))
        gen = policy.generate_ids(filled, sampling, rows=list(range(lo, lo + len(filled))))
        completions += [gen.completion_ids(b) for b in range(len(chunk))]
    lp_pol = completion_logprobs(policy, prompt_ids, completions, batch_size=batch_size)
    lp_ref = completion_logprobs(reference, prompt_ids, completions, batch_size=batch_size)
    kl_N = np.array([float(np.sum(a - b)) for a, b in zip(lp_pol, lp_ref, strict=True)], np.float64)
    return kl_N, completions


def kl_on_samples(
    policy: Generator,
    reference: Generator,
    prompt_ids: Sequence[np.ndarray],
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Sequence-level KL(policy || reference) on one policy sample per prompt (see `sample_kl`).

    Returns {"eval/kl": mean over samples, "eval/kl_stderr": its standard error, "eval/kl_samples": count,
    "eval/sample_length": mean sampled tokens, "eval/distinct_1", "eval/distinct_2": the samples'
    diversity (`jdpo.report.diversity.distinct_n` over their tokens, each sample's stop token left out)}.
    """

    kl_N, completions = sample_kl(
        policy, reference, prompt_ids, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
    )
    n = len(kl_N)
    return {
        "eval/kl": float(kl_N.mean()) if n else math.nan,
        "eval/kl_stderr": float(kl_N.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "eval/kl_samples": n,
        "eval/sample_length": float(np.mean([len(c) for c in completions])) if n else math.nan,
        **diversity_metrics([without_stop(c, policy.stop_ids) for c in completions], prefix="eval/"),
    }


def without_stop(completion_ids: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
    """A completion's tokens without the stop token it ended on (every finished sample has one: counted,
    it would make every sample look alike to distinct-n)."""
    if len(completion_ids) and int(completion_ids[-1]) in stop_ids:
        return completion_ids[:-1]
    return completion_ids


def compare_generations(
    policy,
    reference,
    prompts: Sequence[Prompt],
    answer_checker: AnswerChecker | None = None,
    *,
    answers: Sequence[Any] | None = None,
    sampling: SamplingParams | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    mesh=None,
    title: str = "Side-by-side generations",
    metrics: dict[str, Any] | None = None,
    options: Sequence[dict] | None = None,
) -> dict[str, Any]:
    """Generate with both models on the same prompts and put the answers side by side.

    Args:
      policy, reference: checkpoint directories or `Generator`s.
      prompts: text or message lists.
      answer_checker: `(prompt, completion) -> True / False / None (not checkable)`, e.g.
        `arithmetic_checker`.
      answers: optional known-good answers (e.g. the data's chosen completions), shown in a third column.
      sampling: default greedy with 64 new tokens, so the comparison is deterministic.
      out_dir: when given, writes samples.jsonl and samples.md there.
      metrics: extra numbers for the page's summary table (e.g. `evaluate`'s).
      options: per prompt its `tools` / `chat_template_kwargs` (`jdpo.data.chat`), as records carry them.
    Returns {"rows": [{"prompt", "reference", "policy", ["answer"], ["reference_correct", "policy_correct"]}],
    "summary": {"checked", "policy_correct", "reference_correct", "wins", "losses", "ties", "win_rate"}
    (rates as fractions; empty without a checker or checkable prompt), "paths": written files}.
    """
    policy, reference = _as_generator(policy, mesh=mesh), _as_generator(reference, mesh=mesh)
    sampling = sampling or SamplingParams(max_new_tokens=64, temperature=0.0)
    pol = policy.generate(prompts, sampling, batch_size=batch_size, options=options)
    ref = reference.generate(prompts, sampling, batch_size=batch_size, options=options)
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {
            "prompt": prompt,
            "reference": ref[i]["completion"],
            "policy": pol[i]["completion"],
        }
        if answers is not None:
            row["answer"] = answers[i]
        if answer_checker is not None:
            row["reference_correct"] = answer_checker(prompt, row["reference"])
            row["policy_correct"] = answer_checker(prompt, row["policy"])
        rows.append(row)
    summary = summarize(rows)
    paths = write_side_by_side(rows, summary, out_dir, title=title, metrics=metrics) if out_dir else {}
    return {"rows": rows, "summary": summary, "paths": paths}


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """Correctness rates and the policy's win rate over rows both of whose answers could be checked."""
    checked = [
        r for r in rows if r.get("policy_correct") is not None and r.get("reference_correct") is not None
    ]
    n = len(checked)
    if not n:
        return {}
    wins = sum(bool(r["policy_correct"]) and not r["reference_correct"] for r in checked)
    losses_ = sum(bool(r["reference_correct"]) and not r["policy_correct"] for r in checked)
    ties = n - wins - losses_
    return {
        "checked": n,
        "policy_correct": sum(bool(r["policy_correct"]) for r in checked) / n,
        "reference_correct": sum(bool(r["reference_correct"]) for r in checked) / n,
        "wins": wins,
        "losses": losses_,
        "ties": ties,
        "win_rate": (wins + 0.5 * ties) / n,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """One line: correctness before (reference) and after (policy), and the win rate."""
    if not summary:
        return "no checkable prompts"
    return (
        f"correct: reference {summary['reference_correct']:.1%} -> policy {summary['policy_correct']:.1%} "
        f"on {summary['checked']} prompts; policy wins {summary['wins']}, loses {summary['losses']}, "
        f"ties {summary['ties']} (win rate {summary['win_rate']:.1%})"
    )


def markdown_cell(x: Any) -> str:
    """Markdown table cell: escaped HTML (special tokens stay visible), pipes escaped, newlines as <br>."""
    if isinstance(x, list):  # messages
        x = "\n".join(f"**{m.get('role', '?')}**: {m.get('content', '')}" for m in x)
    # Control characters (untrained models emit them) would break the table's lines: show them escaped.
    text = "".join(
        f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" and ch != "\n" else ch for ch in str(x)
    )
    text = html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")
    return text if text.strip() else "*(empty)*"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else " ✓" if ok else " ✗"


def render_markdown(rows: Sequence[dict], summary: dict, *, title: str, metrics: dict | None = None) -> str:
    """A readable page: summary numbers, then one table row per prompt (prompt | reference | policy)."""
    lines = [f"# {title}", ""]
    numbers = dict(metrics or {})
    if summary:
        numbers.update({f"correct/{k}": v for k, v in summary.items()})
    if numbers:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in numbers.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
        if summary:
            lines += [format_summary(summary), ""]
    has_answer = any("answer" in r for r in rows)
    header = "| # | prompt | reference | policy |" + (" answer |" if has_answer else "")
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for i, r in enumerate(rows):
        cells = [
            str(i),
            markdown_cell(r["prompt"]),
            markdown_cell(r["reference"]) + _mark(r.get("reference_correct")),
            markdown_cell(r["policy"]) + _mark(r.get("policy_correct")),
        ]
        if has_answer:
            cells.append(markdown_cell(r.get("answer", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_side_by_side(rows, summary, out_dir, *, title: str, metrics: dict | None = None) -> dict[str, Path]:
    """samples.jsonl (one row per prompt) and samples.md (the page) under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "samples.jsonl", out / "samples.md"
    with open(jsonl, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    md.write_text(render_markdown(rows, summary, title=title, metrics=metrics))
    return {"jsonl": jsonl, "markdown": md}


# ------------------------------------------------------------------------------------------------
# Everything together
# ------------------------------------------------------------------------------------------------


def run_config(model_dir):
    """The `jdpo.config.Config` of the run whose export `model_dir` is (its parent's config.yaml, as
    `jdpo train` writes it), else None."""

    cfg = Path(model_dir).resolve().parent / "config.yaml"
    return load_config(cfg) if cfg.exists() else None


def _sample_prompts(records, n: int) -> tuple[list, list, list]:
    """The first `n` distinct prompts in data order, with their known-good answers (a pair's chosen
    completion, a rated example's completion if labelled good, else "") and their chat fields."""
    chosen_prompts: list[int] = []
    seen: set[str] = set()
    for k in range(len(records)):
        key = json.dumps(records[k]["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            chosen_prompts.append(k)
        if len(chosen_prompts) == n:
            break
    prompts = [records[k]["prompt"] for k in chosen_prompts]
    # The known-good answer: a pair's chosen completion, a rated example's completion if labelled good.
    answers = [records[k]["chosen"] if "chosen" in records[k] else
               (records[k]["completion"] if records[k]["label"] else "") for k in chosen_prompts]  # fmt: skip
    return prompts, answers, [chat_fields(records[k]) for k in chosen_prompts]


def evaluate(
    policy,
    reference,
    data,
    *,
    dpo=None,
    beta: float | None = None,
    num_samples: int = 16,
    out_dir: str | Path | None = None,
    format: str = "auto",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_new_tokens: int = 64,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    answer_checker: AnswerChecker | None = arithmetic_checker,
    batch_rows: int = 8,
    batch_size: int = 16,
    mesh=None,
    chat_template_kwargs=None,
) -> dict[str, Any]:
    """Preference metrics on `data`; KL on policy samples and side by side generations for `num_samples`
    prompts (the data's first distinct ones).

    Args:
      policy, reference: checkpoint directories or `Generator`s of the same architecture.
      data: a `jdpo.data.load_preferences` source (path, hub name, mixture) or a list of records.
      dpo: the loss settings (`jdpo.config.DPOSection`) of `eval/loss` and the rewards; default: the
        run's own (model_dir/../config.yaml, as `jdpo train` writes it), else the defaults (sigmoid, 0.1).
      beta: overrides dpo.beta.
      max_length, max_prompt_length: tokenisation caps; default: the run's data settings, else the
        config's defaults (as `jdpo train` would tokenise the data).
      sampling: of the side-by-side generations (default greedy with max_new_tokens); the KL always samples
        at temperature 1.
      out_dir: writes metrics.json, samples.jsonl, samples.md.
      chat_template_kwargs: the chat template's arguments (default: the run's data.chat_template_kwargs);
        a record's own `chat_template_kwargs` / `tools` apply to its pair and its samples.
    Returns {"metrics": {eval/... numbers}, "summary": correctness (see `summarize`), "rows", "paths"}.
    """
    import dataclasses

    run = None if isinstance(policy, Generator) else run_config(policy)
    run = run or Config()
    dpo = run.dpo if dpo is None else dpo
    if beta is not None:
        dpo = dataclasses.replace(dpo, beta=float(beta))
    loss = dpo.loss_spec()  # the one loss of every metric below
    max_length = run.data.max_length if max_length is None else max_length
    max_prompt_length = run.data.max_prompt_length if max_prompt_length is None else max_prompt_length
    if chat_template_kwargs is None:
        chat_template_kwargs = dict(run.data.chat_template_kwargs)
    policy, reference = (_as_generator(m, mesh=mesh, chat_template_kwargs=chat_template_kwargs)
                         for m in (policy, reference))  # fmt: skip
    _check_same_architecture(policy, reference)
    records = data if isinstance(data, list) else jdata.load_preferences(data, format, seed=seed)
    rated = any(unpaired.is_unpaired(r) for r in records)
    # An unpaired run on pairs: the pairwise metrics (preference accuracy) of its implicit reward.
    tokenize = unpaired.tokenizer_for(
        dpo if rated else Config().dpo, seed=seed, setting="--loss-type", use="be scored with"
    )
    pairs, report = tokenize(records, policy.tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length,
                             chat_template_kwargs=policy.chat_template_kwargs)  # fmt: skip
    if not len(pairs):
        raise DataError(f"no usable preference pairs in {data!r}: {report.pairs_read} read, dropped "
                        f"{dict(report.dropped) or 'none'}")  # fmt: skip
    metrics = {"eval/beta": loss.beta}
    pref = preference_metrics(policy, reference, pairs, loss=loss, batch_rows=batch_rows)
    if "eval/kl" in pref:  # KTO's reference point z_0; eval/kl is the sampled KL below
        pref["eval/kto_kl"] = pref.pop("eval/kl")
    metrics.update(pref)

    prompts, answers, options = _sample_prompts(records, num_samples)
    if prompts:
        prompt_ids = policy.encode_prompts(prompts, max_prompt_length=max_prompt_length, options=options)
        metrics.update(
            kl_on_samples(
                policy, reference, prompt_ids, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
            )
        )
    sampling = sampling or SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    cmp = compare_generations(
        policy,
        reference,
        prompts,
        answer_checker,
        answers=answers,
        sampling=sampling,
        out_dir=out_dir,
        batch_size=batch_size,
        title="Policy vs reference",
        metrics=metrics,
        options=options,
    )
    for k, v in cmp["summary"].items():
        metrics[f"eval/correct/{k}"] = v
    paths = dict(cmp["paths"])
    if out_dir:
        paths["metrics"] = Path(out_dir) / "metrics.json"
        paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    return {"metrics": metrics, "summary": cmp["summary"], "rows": cmp["rows"], "paths": paths}
