"""Online DPO (`dpo.online: true`): every step samples from the current policy, scores, pairs and trains.

    online:
      reward: jdpo.demo:sum_reward      # fn(prompts: list[str], completions: list[str]) -> one float each
      samples_per_prompt: 4             # the pair is each prompt's best vs worst sample
      prompts_per_step: 16
      max_new_tokens: 4

One step (`OnlineData.next_host_batches`, where an offline run takes its next batch):
  1. the next `prompts_per_step` prompts of data.train (a permutation per epoch drawn from the seed; a
     JSONL of {"prompt": ...} / {"messages": ...} rows, or the prompts of any preference source), each
     repeated `samples_per_prompt` times, are sampled with the current weights by `jdpo.scoring.generate`'s
     KV-cache sampler: prompts left-padded to one fixed length (the longest prompt of the split, rounded
     up to LENGTH_BUCKET), a fixed number of rows, so prefill and the decode loop compile once per run;
  2. the reward function scores every (prompt, completion) text (prompts as `jdpo.data.prompt_texts`
     renders them: text as is, message lists through the chat template; completions decoded without
     special tokens). Its answer is checked every call: one finite number per completion;
  3. per prompt the pair is the highest-reward sample (chosen) vs the lowest (rejected), the first of
     equals; a prompt whose samples all score the same is dropped and counted (`online/tied_fraction`);
  4. the pairs (prompt ids + sampled ids, the stop token included when the sample reached it) are laid
     out `slots` to a row in the step's fixed `train.batch_rows x train.grad_accum` rows
     (`jdpo.data.make_batch`), and the usual jitted train step runs on them. Its reference log-probs are
     the online reference's (`dpo.reference: online`: the frozen initial weights; under LoRA the base
     with the initial adapters, i.e. adapters off): a cache computed before training cannot hold
     log-probs of completions sampled later, so `config.validate` refuses `reference: cached`.
A step with no pair left (every prompt tied) makes no update: no train step runs (the optimizer state,
its step count and the weights are unchanged), the loop's step still counts, and only the online/
metrics are logged.

Resume: the prompt cursor and the sampling RNG (numpy PCG64; each step draws its sampler seed from it)
are the data position in the checkpoint's meta (`state` / `restore`), so a resumed run samples exactly
what the uninterrupted one would have. The eval split (data.eval) is preference pairs, evaluated as in
an offline run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jdpo import data as jdata
from jdpo.config import Config, ConfigError
from jdpo.data import (
    TokenizedPairs,
    encode_prompts,
    make_batch,
    parse_source_spec,
    prompt_texts,
    read_rows,
    read_source,
)
from jdpo.data.batch import Batch
from jdpo.data.chat import chat_fields, read_chat_fields
from jdpo.data.layout import BatchLayout, pairs_per_row, row_length_for, sampled_pair_length
from jdpo.data.records import as_messages
from jdpo.data.sources import DataError
from jdpo.report.diversity import distinct_n
from jdpo.scoring.generate import Generator, SamplingParams
from jdpo.train.guards import StopRun, sigterm_pending
from jdpo.train.run_data import account, eval_source

log = logging.getLogger(__name__)

# Prompts are left-padded to a multiple of this (the longest prompt of the split, rounded up).
LENGTH_BUCKET = 8

# Metric names of an online step (besides the usual train metrics of `jdpo.train.step`).
REWARD_MEAN = "online/reward_mean"  # mean reward of every sample of the step
REWARD_CHOSEN = "online/reward_chosen"  # mean reward of the chosen samples (absent without a pair)
REWARD_REJECTED = "online/reward_rejected"  # ... of the rejected ones
TIED_FRACTION = "online/tied_fraction"  # share of the step's prompts dropped: all samples scored the same
PAIRS = "online/pairs"  # pairs trained on this step
COMPLETION_LENGTH = "online/completion_length"  # mean sampled tokens per completion (stop token included)
DISTINCT_1, DISTINCT_2 = "online/distinct_1", "online/distinct_2"  # `jdpo.report.diversity` over the samples
SAMPLE_TIME = "online/sample_time"  # seconds: sampling, scoring and building the batch
TRAIN_TIME = "online/train_time"  # seconds: the train step (0 when it was skipped)

Prompt = str | list[dict]
RewardFn = Callable[[list[str], list[str]], Sequence[float]]


# ------------------------------------------------------------------------------------------------
# The reward function
# ------------------------------------------------------------------------------------------------


def load_reward(spec: str) -> RewardFn:
    """The callable `online.reward` names: 'module:function' (imported as Python imports it) or
    'path/to/file.py:function'. ConfigError naming the field when it cannot be imported or found."""
    module, _, name = spec.rpartition(":")
    where = f"online.reward={spec!r}"
    if not module or not name:
        raise ConfigError(f"{where} must be 'module:function' or 'path/to/file.py:function'")
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise ConfigError(f"{where}: no file {path}")
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            file_spec = importlib.util.spec_from_file_location(f"jdpo_reward_{digest}", path)
            mod = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:  # ImportError, or whatever the module raises while it is imported
        raise ConfigError(f"{where}: cannot import {module} ({type(e).__name__}: {e})") from None
    if not hasattr(mod, name):
        raise ConfigError(f"{where}: module {module} has no attribute {name!r}")
    fn = getattr(mod, name)
    if not callable(fn):
        raise ConfigError(f"{where}: {module}.{name} is a {type(fn).__name__}, not a function")
    return fn


class RewardError(ConfigError):
    """The reward raised (SystemExit included), ran past `online.reward_timeout` or scored badly; the
    message names `online.reward` and when (the probe, or the step; mid-run, the checkpoint kept)."""


class RewardInterrupted(Exception):  # noqa: N818 (SIGTERM, not an error)
    """SIGTERM arrived while the reward ran (`call_reward`)."""


POLL_S = 0.05  # how often a waiting reward call looks at the clock and at SIGTERM


def call_reward(fn: RewardFn, prompts: list, completions: list, *, timeout: float, where: str,
                interrupted: Callable[[], bool] = sigterm_pending):  # fmt: skip
    """fn(prompts, completions) in a daemon thread of its own, so that nothing it does ends or freezes the
    run: any exception it raises (BaseException included: a SystemExit must not end a run as a success)
    and a call past `timeout` seconds (0: no bound; the call is abandoned, still running) are RewardError;
    `interrupted()` (SIGTERM) turning true during the call is RewardInterrupted."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target():
        try:
            box["out"] = fn(prompts, completions)
        except BaseException as e:  # noqa: BLE001 (handed to the caller, named)
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="jdpo-reward", daemon=True).start()
    deadline = time.monotonic() + timeout if timeout else math.inf
    while not done.wait(POLL_S):
        if interrupted():
            raise RewardInterrupted(where)
        if time.monotonic() > deadline:
            raise RewardError(
                f"{where}: did not return within online.reward_timeout={timeout:g} s (the call is "
                "abandoned); make the reward faster, or raise online.reward_timeout (0: no bound)"
            )
    if "error" in box:
        e = box["error"]
        raise RewardError(f"{where} raised {type(e).__name__}: {e}") from None
    return box["out"]


def score(fn: RewardFn, spec: str, prompts: Sequence[str], completions: Sequence[str], *, when: str,
          timeout: float = 0.0, interrupted: Callable[[], bool] = sigterm_pending):  # fmt: skip
    """fn(prompts, completions) as a float64 array [n] (`call_reward`: in a thread, bounded by `timeout`),
    checked: a sequence (list, tuple, 1-D array) of one real number per completion, all finite.
    RewardError naming `online.reward` and `when` otherwise."""
    where = f"online.reward={spec!r} ({when})"
    n = len(completions)
    out = call_reward(
        fn, list(prompts), list(completions), timeout=timeout, where=where, interrupted=interrupted
    )
    if isinstance(out, np.ndarray) or hasattr(out, "__array__"):
        arr = np.asarray(out)
        if arr.dtype.kind not in "biuf":
            raise RewardError(f"{where}: returned an array of {arr.dtype}, expected numbers")
        if arr.ndim != 1:
            raise RewardError(f"{where}: returned an array of shape {arr.shape}, expected [{n}]")
        values = arr.astype(np.float64)
    elif isinstance(out, list | tuple):
        for i, x in enumerate(out):
            if not isinstance(x, numbers.Real | np.bool_):
                raise RewardError(f"{where}: item {i} is a {type(x).__name__} ({x!r:.60}), expected a number")
        values = np.asarray([float(x) for x in out], np.float64)
    else:
        raise RewardError(f"{where}: returned a {type(out).__name__}, expected a list of {n} numbers")
    if len(values) != n:
        raise RewardError(f"{where}: returned {len(values)} scores for {n} completions (one each)")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        raise RewardError(
            f"{where}: score {values[i]} for completion {i} ({completions[i]!r:.60} of prompt "
            f"{prompts[i]!r:.60}); scores must be finite"
        )
    return values


def probe_reward(fn: RewardFn, spec: str, prompt_texts: Sequence[str], timeout: float) -> None:
    """Call the reward once on a tiny probe (before the model loads): 3 completions of the first prompts."""
    prompts = [prompt_texts[min(i, len(prompt_texts) - 1)] for i in (0, 0, 1)]
    score(fn, spec, prompts, ["", "a", "ab"], when="called on a probe of 3 completions before training",
          timeout=timeout)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

_PAIR_KEYS = {"chosen", "rejected", "completion", "label", "human_ref_A", "message_id"}


def _is_prompt_row(row: Any) -> bool:
    return isinstance(row, dict) and bool({"prompt", "messages"} & set(row)) and not (_PAIR_KEYS & set(row))


def _check_prompt(value: Any, where: str) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and (isinstance(m.get("content"), str) or m.get("tool_calls"))
        for m in value
    ):  # fmt: skip
        return as_messages(value, "prompt", where, "user")  # keeps tool calls, tool turns, reasoning
    raise DataError(f'{where}: "prompt" must be text or a list of {{"role", "content"}} messages, got '
                    f"{value!r:.80}")  # fmt: skip


def read_prompts(path: str, format: str = "auto", *, skip_bad_rows: bool = False) -> tuple[list, list, list]:
    """(prompts, where each came from, each one's chat fields) of one source: rows of {"prompt"} or
    {"messages"} (a prompt file; besides them only `tools` / `chat_template_kwargs`), or, for any
    preference source `jdpo.data.read_source` reads, the records' prompts (a text prompt of a record
    whose completions are messages becomes a user turn, as training renders it) and chat fields."""

    first = next((row for _, row in read_rows(path) if not isinstance(row, DataError)), None)
    prompts, wheres, options = [], [], []
    if _is_prompt_row(first):
        for where, row in read_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                if not _is_prompt_row(row):
                    got = sorted(row) if isinstance(row, dict) else row
                    raise DataError(f"{where}: a prompt file's rows hold a \"prompt\" or \"messages\" "
                                    f"field only, got {got!r:.80}")  # fmt: skip
                prompt = _check_prompt(row.get("prompt", row.get("messages")), where)
                options.append(read_chat_fields(row, where))
                prompts.append(prompt)
                wheres.append(where)
            except DataError:
                if not skip_bad_rows:
                    raise
        return prompts, wheres, options
    records = read_source(path, format, skip_bad_rows=skip_bad_rows)
    for rec, where in zip(records, records.where, strict=True):
        prompt = rec["prompt"]
        completion = rec.get("chosen", rec.get("completion"))
        if isinstance(prompt, str) and isinstance(completion, list):
            prompt = [{"role": "user", "content": prompt}]
        prompts.append(prompt)
        wheres.append(where)
        options.append(chat_fields(rec))
    return prompts, wheres, options


def load_prompts(sources: Sequence[str], format: str = "auto", *, seed: int = 0,
                 skip_bad_rows: bool = False) -> tuple[list, list, list]:  # fmt: skip
    """The distinct prompts of a mixture (`path:5000` / `path:0.25` amounts as `load_preferences` takes
    them, the subset deterministic for `seed`), first occurrence kept, with where each came from and its
    chat fields (a prompt with other tools or template arguments is another prompt)."""

    prompts, wheres, options, seen = [], [], [], set()
    for i, source in enumerate(sources):
        spec = parse_source_spec(source)
        got, where, opts = read_prompts(spec.path, format, skip_bad_rows=skip_bad_rows)
        for k in spec.take(len(got), np.random.default_rng([seed, i])):
            key = json.dumps([got[k], opts[k]], sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(got[k])
                wheres.append(where[k])
                options.append(opts[k])
    if not prompts:
        raise DataError(f"data.train ({', '.join(sources)}) holds no prompts")
    return prompts, wheres, options


def _rng_state(rng: np.random.Generator) -> dict:
    s = rng.bit_generator.state  # PCG64: 128-bit ints, kept as strings (any JSON reader keeps them)
    return {"state": str(s["state"]["state"]), "inc": str(s["state"]["inc"]),
            "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}  # fmt: skip


def _set_rng_state(rng: np.random.Generator, saved: dict) -> None:
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": int(saved["has_uint32"]),
        "uinteger": int(saved["uinteger"]),
    }


class PromptOrder:
    """Which prompts each step samples, and its sampler seed: an endless walk over per-epoch permutations
    (drawn from (seed, epoch)) `per_step` prompts at a time, and a PCG64 stream of seeds. `state()` /
    `restore()` is the run's data position (the checkpoint's meta["data"]); "layout" names the prompts
    and settings it belongs to."""

    def __init__(self, n: int, per_step: int, *, seed: int, layout: str):
        self.n, self.per_step, self.seed, self.layout = n, per_step, seed, layout
        self.cursor = 0  # prompts handed out so far
        self.rng = np.random.default_rng([seed, 0x5A3])
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    @property
    def epoch(self) -> int:
        return self.cursor // self.n

    def next(self) -> tuple[list[int], int]:
        """(the step's prompt indices, its sampler seed)."""
        out: list[int] = []
        while len(out) < self.per_step:
            epoch, offset = divmod(self.cursor, self.n)
            take = min(self.per_step - len(out), self.n - offset)
            out.extend(int(i) for i in self._perm(epoch)[offset : offset + take])
            self.cursor += take
        return out, int(self.rng.integers(0, 2**32))

    def state(self) -> dict:
        return {"cursor": self.cursor, "sampler_rng": _rng_state(self.rng), "seed": self.seed,
                "layout": self.layout}  # fmt: skip

    def restore(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        _set_rng_state(self.rng, state["sampler_rng"])


# ------------------------------------------------------------------------------------------------
# The run's online pieces
# ------------------------------------------------------------------------------------------------


class OnlineData:
    """An online run's data (`jdpo.train.run_data`'s interface): its prompts, reward, sampler and pair
    layout, and the eval split (preference pairs). Built by `load` before the model loads;
    `next_host_batches` is one step's sampling, scoring and batch."""

    train_pairs = None  # no fixed pairs: they are sampled every step

    def __init__(self, config: Config, tokenizer, prompts: list, wheres: list, *, mesh, layout: BatchLayout,
                 eval_pairs=None, options: list | None = None):  # fmt: skip
        c, on = config, config.online
        self.config, self.tokenizer, self.mesh, self.layout = config, tokenizer, mesh, layout
        self.prompts, self.where, self.eval_pairs = prompts, wheres, eval_pairs
        chat = dict(chat_template_kwargs=c.data.chat_template_kwargs, options=options)
        self.ids = _encode(tokenizer, prompts, wheres, c.data.max_prompt_length, **chat)
        self.texts = prompt_texts(tokenizer, prompts, **chat)
        self.reward = load_reward(on.reward)
        probe_reward(self.reward, on.reward, self.texts, on.reward_timeout)
        longest = max(len(x) for x in self.ids)
        self.prompt_length = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET  # the sampler's fixed T
        self.rows = c.train.batch_rows * c.train.grad_accum
        self.slots = online_slots(on, layout.row_length, longest, self.rows)  # pairs per row
        h = hashlib.sha256()
        for x in self.ids:
            h.update(np.asarray(len(x), np.int64).tobytes() + x.astype(np.int32).tobytes())
        h.update(json.dumps([on.prompts_per_step, c.train.seed]).encode())
        self.order = PromptOrder(len(prompts), on.prompts_per_step, seed=c.train.seed, layout=h.hexdigest())
        self.steps_per_epoch = len(prompts) / on.prompts_per_step
        self.total_steps = c.train.max_steps or max(1, math.ceil(c.train.num_epochs * self.steps_per_epoch))
        self._generator = None
        self.last: dict[str, float] = {}  # the online/ metrics of the last step

    @classmethod
    def load(cls, config: Config, tokenizer, *, mesh, shared_prompt: bool) -> OnlineData:
        """The prompts of data.train, the reward (imported and probed), the eval split (data.eval:
        preference pairs) and the step count, all before the model loads."""
        c, d = config, config.data
        if jax.process_count() > 1:
            raise ConfigError("dpo.online runs in one process (its sampler reads every sample on the host); "
                              f"this run has {jax.process_count()}")  # fmt: skip
        if d.eval_fraction > 0:
            raise ConfigError("dpo.online: data.eval_fraction holds out preference records; an online run's "
                              "eval split is data.eval (preference pairs): set data.eval_fraction 0")  # fmt: skip
        prompts, wheres, options = load_prompts(
            list(d.train), d.format, seed=c.train.seed, skip_bad_rows=d.skip_bad_rows
        )
        eval_pairs = report = held = None
        if d.eval:
            held = jdata.load_preferences(
                list(d.eval), d.format, seed=c.train.seed, skip_bad_rows=d.skip_bad_rows
            )
            eval_pairs, report = jdata.tokenize_preferences(
                held, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                skip_bad_rows=d.skip_bad_rows, chat_template_kwargs=d.chat_template_kwargs,
            )  # fmt: skip
        # P from the eval pairs (the training pairs are sampled: `online_slots` sizes their rows).
        row_length = row_length_for(d.max_length, d.row_length)
        layout = BatchLayout.for_pairs(
            [] if eval_pairs is None else [eval_pairs],
            rows_per_batch=c.train.batch_rows,
            row_length=row_length,
            packing=d.packing,
            shared_prompt=shared_prompt,
        )
        data = cls(c, tokenizer, prompts, wheres, mesh=mesh, layout=layout, eval_pairs=eval_pairs,
                   options=options)  # fmt: skip
        if c.train.keep_best and eval_pairs is None:
            raise ConfigError(
                f"train.keep_best={c.train.keep_best!r} needs an eval split: give data.eval files"
            )
        if eval_pairs is not None:
            account(
                "eval", report, data.one_pass(eval_pairs), row_length, eval_source(c), held.report.dropped
            )
        return data

    def one_pass(self, pairs):
        return jdata.one_pass(pairs, self.layout)

    def reference_splits(self) -> list[tuple[str, Any]]:
        return [] if self.eval_pairs is None else [("eval", self.eval_pairs)]

    def describe(self) -> str:
        on = self.config.online
        return (f"{len(self.prompts):,} train prompts (online: {on.prompts_per_step} a step x "
                f"{on.samples_per_prompt} samples, <= {on.max_new_tokens} new tokens, "
                f"reward {on.reward})")  # fmt: skip

    def state(self) -> dict:
        return self.order.state()

    def restore(self, state: dict) -> None:
        self.order.restore(state)

    def record(self, step: int) -> dict[str, float]:
        return {"epoch": step / self.steps_per_epoch}

    def step_metrics(self, train_time: float) -> dict[str, float]:
        """The step's sampling metrics and its time split."""
        return {**self.last, TRAIN_TIME: train_time}

    def round_ended(self) -> bool:
        return False  # online runs have no rounds (config.validate refuses train.rounds > 1)

    def generator(self, model):
        """The KV-cache sampler on the current weights (made once; its parameters follow the policy)."""
        if self._generator is None:
            self._generator = Generator(model, self.tokenizer, mesh=self.mesh, length_bucket=self.prompt_length,
                                        model_dir=self.config.model.path,
                                        chat_template_kwargs=self.config.data.chat_template_kwargs)  # fmt: skip
        else:
            self._generator.params = nnx.split(model)[1]
        return self._generator

    def sampling(self, seed: int) -> SamplingParams:
        on = self.config.online
        return SamplingParams(max_new_tokens=on.max_new_tokens, temperature=on.temperature, top_p=on.top_p,
                              seed=seed)  # fmt: skip

    def next_host_batches(self, step: int, policy) -> list[Batch] | None:
        """Sample, score and pair the next prompts with the model `policy()`: this step's micro-batches,
        or None when every prompt tied. Sets `last` to the step's online/ metrics."""
        t0 = time.perf_counter()
        on = self.config.online
        k = on.samples_per_prompt
        idx, seed = self.order.next()
        prompt_ids = [self.ids[i] for i in idx]
        gen = self.generator(policy())
        out = gen.generate_ids([p for p in prompt_ids for _ in range(k)], self.sampling(seed))
        samples = [out.completion_ids(b) for b in range(len(idx) * k)]
        texts = [gen.decode(s) for s in samples]
        try:  # a failed or interrupted call ends the run before this step, its last state saved
            rewards = score(self.reward, on.reward, [self.texts[i] for i in idx for _ in range(k)], texts,
                            when=f"step {step}", timeout=on.reward_timeout).reshape(len(idx), k)  # fmt: skip
        except RewardError as e:
            raise StopRun("reward_error", e) from None
        except RewardInterrupted:
            raise StopRun("sigterm") from None
        kept = [j for j in range(len(idx)) if rewards[j].max() != rewards[j].min()]  # ties teach nothing
        self.last = _sample_metrics(rewards, samples, kept)
        host = None
        if kept:
            chosen = [samples[j * k + int(np.argmax(rewards[j]))] for j in kept]
            rejected = [samples[j * k + int(np.argmin(rewards[j]))] for j in kept]
            pairs = TokenizedPairs([prompt_ids[j] for j in kept], chosen, rejected,
                                   np.asarray([idx[j] for j in kept], np.int64))  # fmt: skip
            P, B = self.slots, self.config.train.batch_rows
            rows = [list(range(r * P, min((r + 1) * P, len(kept)))) for r in range(self.rows)]
            host = [make_batch(pairs, rows[a : a + B], self.layout.row_length, P, self.layout.shared_prompt)
                    for a in range(0, self.rows, B)]  # fmt: skip
        self.last[SAMPLE_TIME] = time.perf_counter() - t0
        return host


def _encode(tokenizer, prompts: list, wheres: list, max_prompt_length: int, *, chat_template_kwargs=None,
            options=None) -> list[np.ndarray]:  # fmt: skip
    """The prompts' ids, as training encodes them; a template error or an empty prompt names its line."""
    chat = dict(chat_template_kwargs=chat_template_kwargs)
    try:
        ids = encode_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length, options=options, **chat)
    except (TypeError, ValueError):  # the chat template rejected one: find it, name its line
        for k, prompt in enumerate(prompts):
            try:
                encode_prompts(tokenizer, [prompt], options=None if options is None else [options[k]], **chat)
            except (TypeError, ValueError) as e:
                raise DataError(f"{wheres[k]}: {str(e).removeprefix('prompt 0: ')}") from None
        raise
    for k, x in enumerate(ids):
        if not len(x):
            raise DataError(f"{wheres[k]}: an empty prompt (no tokens, and the tokenizer adds no BOS)")
    return ids


def online_slots(on, row_length: int, longest: int, rows: int) -> int:
    """Pairs per row of an online step: a pair takes at most 2 x (longest prompt + max_new_tokens);
    the step's rows must hold `online.prompts_per_step` of them."""
    pair_tokens = sampled_pair_length(longest, on.max_new_tokens)
    if pair_tokens > row_length:
        raise ConfigError(
            f"data.row_length={row_length} cannot hold one online pair of up to {pair_tokens} "
            f"tokens (2 x (prompt <= {longest} + online.max_new_tokens={on.max_new_tokens})): raise "
            "data.row_length, or lower online.max_new_tokens / data.max_prompt_length"
        )
    slots = pairs_per_row(row_length, [np.asarray([pair_tokens])])
    if rows * slots < on.prompts_per_step:
        raise ConfigError(
            f"online.prompts_per_step={on.prompts_per_step} pairs do not fit in a step's {rows} rows "
            f"(train.batch_rows x train.grad_accum) of {slots} pairs each (data.row_length="
            f"{row_length} / pairs of up to {pair_tokens} tokens): raise train.batch_rows or "
            "data.row_length, or lower online.prompts_per_step"
        )
    return slots


def _sample_metrics(rewards: np.ndarray, samples: list, kept: list[int]) -> dict[str, float]:
    """The online/ metrics of one step's samples and the pairs kept."""
    tokens = [s.tolist() for s in samples]
    out = {
        REWARD_MEAN: float(rewards.mean()),
        TIED_FRACTION: 1.0 - len(kept) / len(rewards),
        PAIRS: float(len(kept)),
        COMPLETION_LENGTH: float(np.mean([len(s) for s in samples])),
        DISTINCT_1: distinct_n(tokens, 1),
        DISTINCT_2: distinct_n(tokens, 2),
    }
    if not math.isfinite(out[DISTINCT_2]):  # one-token samples hold no bigram
        del out[DISTINCT_2]
    if kept:
        out[REWARD_CHOSEN] = float(rewards[kept].max(axis=1).mean())
        out[REWARD_REJECTED] = float(rewards[kept].min(axis=1).mean())
    return out
