"""Batched sampling with a KV cache: prefill + decode under `jax.jit` with fixed shapes.

    gen = Generator.from_pretrained("runs/demo/final")
    out = gen.generate(["12+35=", [{"role": "user", "content": "hi"}]], SamplingParams(temperature=0))
    out[0]["completion"]                      # "47"
    for piece in gen.stream("12+35=", SamplingParams(max_new_tokens=8)):
        print(piece, end="", flush=True)      # text as it decodes

Layout: prompts are left-padded to a common length T (rounded up to `length_bucket`, so batches of
similar prompts share one compiled program) and the cache holds S = T + max_new_tokens slots per row
(`Transformer.extend` documents the masking: padding is never attended, positions count from each
row's first real token). Prefill is one `extend` over the T prompt slots; every decode step is one
`extend` of a single token at slot T + i, the same compiled function for every token: `generate_ids` runs
the steps inside one `lax.while_loop` (stops early once every row has finished), `stream` calls the jitted
one-token step from Python so tokens can be printed as they come (no recompilation per token).

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p
(nucleus), then a categorical draw. Randomness is a PRNG key per prompt, `fold_in(key(seed), row)`, folded
with the step index, so a prompt's sample depends on the seed and its index in the request only, not on
the batch it landed in or the mesh. A row stops at its first stop token (the tokenizer's EOS, the
model config's / generation_config.json's eos ids and, with a chat template, the template's end-of-turn
token); the stop token is part of the output and later steps emit the pad id.

Prompts are tokenised by `jdpo.data.encode_prompts`, the code that builds training's prompt ids: text as
is, message lists through the tokenizer's chat template with add_generation_prompt=True, exactly one BOS.

Sharding: with a mesh the rows are split over ("data", "fsdp") (the batch is padded with copies of the
first prompt up to a multiple of that), the parameters stay as loaded and the cache is constrained like
the keys / values (rows over data x fsdp, kv heads over tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpo.data import encode_prompts, end_of_turn_id
from jdpo.data.chat import read_chat_fields
from jdpo.data.records import as_messages
from jdpo.models import from_pretrained, load_tokenizer
from jdpo.models import peft as peft_export
from jdpo.parallel.sharding import batch_sharding, constrain, jit_on_mesh, round_rows

Prompt = str | list[dict]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Generation:
    """Output of `Generator.generate_ids` for B prompts and N = max_new_tokens."""

    tokens: np.ndarray  # [B, N] int32: sampled ids, the pad id after a row's stop token
    lengths: np.ndarray  # [B] int32: generated tokens, the stop token included
    finished: np.ndarray  # [B] bool: the row ended on a stop token (else it hit max_new_tokens)
    logits: np.ndarray | None = None  # [B, N, V] float32 logits of each step (with return_logits)

    def completion_ids(self, b: int) -> np.ndarray:
        return self.tokens[b, : self.lengths[b]]


def sample_logits(logits_BxV, keys_B, *, temperature: float, top_k: int, top_p: float):
    """Token ids [B] int32 drawn from float32 logits [B, V] (one typed PRNG key per row in keys_B)."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    x_BxV = logits_BxV.astype(jnp.float32) / temperature
    if 0 < top_k < x_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(x_BxV, top_k)[0][:, -1:]
        x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
    if top_p < 1.0:
        sorted_BxV = -jnp.sort(-x_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix of the sorted tokens whose mass reaches top_p: token i stays when the
        # mass before it is still below top_p (so the most likely token always stays).
        keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        x_BxV = jnp.where(x_BxV < cutoff_Bx1, -jnp.inf, x_BxV)
    return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What the compiled functions close over (hashable: compiled programs are shared per settings)."""

    graphdef: Any
    mesh: Any
    temperature: float
    top_k: int
    top_p: float
    stop_ids: tuple[int, ...]
    pad_id: int
    return_logits: bool


@functools.lru_cache(maxsize=16)
def _compiled(s: _Settings):
    """(prefill, step, loop): jitted functions over a decode state dict (see `_step`)."""

    def prefill(params, ids_BxT, start_B, rows_B, seed, max_new: int):
        model = nnx.merge(s.graphdef, params)
        B, T = ids_BxT.shape
        cache = model.init_cache(B, T + max_new)
        h_BxTxD, cache = model.extend(ids_BxT, cache, jnp.int32(0), start_B)
        keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows_B)
        state = {
            "cache": cache,
            "logits": model.logits(h_BxTxD[:, -1:])[:, 0],  # next-token logits [B, V] (last slot is real)
            "keys": jax.random.key_data(keys_B),
            "start": start_B,
            "slot": jnp.int32(T),
            "i": jnp.int32(0),
            "done": jnp.zeros((B,), bool),
            "tokens": constrain(jnp.full((B, max_new), s.pad_id, jnp.int32), ("batch", None)),
            "lengths": jnp.zeros((B,), jnp.int32),
        }
        if s.return_logits:
            V = state["logits"].shape[-1]
            state["all_logits"] = constrain(jnp.zeros((B, max_new, V), jnp.float32), ("batch", None, None))
        return state

    def step(params, state):
        """Sample token i from the current logits, record it, run it through the model (its k/v go to
        slot T + i) to get the next logits. Finished rows emit pad and stay finished."""
        model = nnx.merge(s.graphdef, params)
        i = state["i"]
        keys_B = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), i))(state["keys"])
        tok_B = sample_logits(
            state["logits"], keys_B, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p
        )
        done_B = state["done"]
        tok_B = jnp.where(done_B, s.pad_id, tok_B)
        new = dict(state)
        new["tokens"] = jax.lax.dynamic_update_slice_in_dim(state["tokens"], tok_B[:, None], i, axis=1)
        if s.return_logits:
            new["all_logits"] = jax.lax.dynamic_update_slice_in_dim(
                state["all_logits"], state["logits"][:, None], i, axis=1
            )
        new["lengths"] = state["lengths"] + (~done_B).astype(jnp.int32)
        new["done"] = done_B | jnp.isin(tok_B, jnp.asarray(s.stop_ids or (-1,), jnp.int32))
        h_Bx1xD, new["cache"] = model.extend(tok_B[:, None], state["cache"], state["slot"], state["start"])
        new["logits"] = model.logits(h_Bx1xD)[:, 0]
        new["slot"], new["i"] = state["slot"] + 1, i + 1
        return new, tok_B

    def loop(params, state):
        N = state["tokens"].shape[1]
        return jax.lax.while_loop(
            lambda st: (st["i"] < N) & ~jnp.all(st["done"]),
            lambda st: step(params, st)[0],
            state,
        )

    return (
        jit_on_mesh(prefill, s.mesh, static_argnames=("max_new",)),
        jit_on_mesh(step, s.mesh, donate_argnums=1),
        jit_on_mesh(loop, s.mesh, donate_argnums=1),
    )


def _stop_ids_from_dir(path) -> list[int]:
    """eos ids a checkpoint's generation_config.json lists (chat models often name end-of-turn there)."""
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class Generator:
    """A model + tokenizer ready to sample: `generate` (text in, text out), `generate_ids`, `stream`.

    Args:
      model: a `jdpo.models.Transformer` (parameters placed as loaded; sharded when loaded with a mesh).
      tokenizer: a transformers tokenizer (needed for text prompts and text output).
      mesh: the mesh the parameters live on, or None for one device.
      stop_ids: token ids that end a row (default: see the module docstring).
      pad_id: emitted after a row's stop token (default: the tokenizer's pad, else EOS, else 0).
      length_bucket: prompt lengths are padded up to a multiple of this (fewer distinct compiled shapes).
      chat_template_kwargs: arguments of the chat template's renders (e.g. {"enable_thinking": False}), as
        a run's `data.chat_template_kwargs`; a prompt's own `options` override them (`encode_prompts`).
    """

    def __init__(self, model, tokenizer=None, *, mesh=None, stop_ids=None, pad_id=None, length_bucket=16,
                 model_dir=None, chat_template_kwargs=None):  # fmt: skip
        self.graphdef, self.params = nnx.split(model)
        self.config = model.config
        self.tokenizer, self.mesh, self.length_bucket = tokenizer, mesh, length_bucket
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if stop_ids is None:
            stop_ids = self._default_stop_ids(model_dir)
        self.stop_ids = tuple(sorted({int(t) for t in stop_ids}))
        if pad_id is None:
            pad_id = next(
                (
                    t
                    for t in (getattr(tokenizer, "pad_token_id", None), self.config.pad_token_id)
                    if t is not None
                ),
                self.stop_ids[0] if self.stop_ids else 0,
            )
        self.pad_id = int(pad_id)

    @classmethod
    def from_pretrained(cls, path, *, mesh=None, options=None, **kwargs):
        """Model and tokenizer from a Hugging Face checkpoint directory (e.g. a run's `final/`), or a PEFT
        adapter directory (a LoRA run's `final/`: its base with the adapter merged). `options`: a
        `jdpo.models.ModelOptions` (None: float32, the loop layout); `kwargs` go to `Generator`."""
        if peft_export.is_adapter_dir(path):
            model, base = peft_export.from_adapter_dir(path, options=options, mesh=mesh)
            has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
            tokenizer = load_tokenizer(path if has_tokenizer else base)
            return cls(model, tokenizer, mesh=mesh, model_dir=path, **kwargs)
        model, _ = from_pretrained(path, options=options, mesh=mesh)
        tokenizer = load_tokenizer(path)
        return cls(model, tokenizer, mesh=mesh, model_dir=path, **kwargs)

    def model(self):
        """The model (graphdef merged with the current parameters)."""
        return nnx.merge(self.graphdef, self.params)

    # -- tokens ------------------------------------------------------------------------------------

    def _default_stop_ids(self, model_dir) -> list[int]:
        ids: list[int] = []
        eos = self.config.eos_token_id
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if model_dir is not None:
            ids += _stop_ids_from_dir(model_dir)
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
            # The last token of a rendered assistant turn is the template's end-of-turn token (what the
            # training completions end with, see jdpo.data.tokenize).
            end_of_turn = end_of_turn_id(tok, self.chat_template_kwargs)
            if end_of_turn is not None:
                ids.append(end_of_turn)
        return ids

    def encode_prompts(
        self, prompts: Sequence[Prompt], *, max_prompt_length: int | None = None, options=None
    ) -> list[np.ndarray]:
        """Prompt token ids as training builds them (`jdpo.data.encode_prompts`): text as is, message lists
        through the chat template with add_generation_prompt=True; one BOS; long prompts keep their end.
        `options[k]`: prompt k's `tools` / `chat_template_kwargs` (`jdpo.data.chat`)."""
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass one to Generator or use generate_ids")
        return encode_prompts(self.tokenizer, prompts, max_prompt_length=max_prompt_length,
                              chat_template_kwargs=self.chat_template_kwargs, options=options)  # fmt: skip

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    # -- sampling ----------------------------------------------------------------------------------

    def _settings(self, sampling: SamplingParams, return_logits: bool) -> _Settings:
        return _Settings(
            graphdef=self.graphdef,
            mesh=self.mesh,
            temperature=float(sampling.temperature),
            top_k=int(sampling.top_k),
            top_p=float(sampling.top_p),
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            return_logits=return_logits,
        )

    def _prefill(self, prompt_ids: Sequence[np.ndarray], sampling: SamplingParams, settings: _Settings,
                 rows: Sequence[int]):  # fmt: skip
        """Left-pad, place on the mesh and run the prefill; returns (state, real row count)."""
        if not len(prompt_ids):
            raise ValueError("no prompts")
        lengths = [len(p) for p in prompt_ids]
        if min(lengths) == 0:
            raise ValueError("an empty prompt (no tokens and no BOS) has nothing to condition on")
        B_real = len(prompt_ids)
        B = round_rows(B_real, self.mesh)
        T = -(-max(lengths) // self.length_bucket) * self.length_bucket
        ids_BxT = np.full((B, T), self.pad_id, np.int32)
        start_B = np.zeros((B,), np.int32)
        rows_B = np.zeros((B,), np.int32)
        for b in range(B):
            p = np.asarray(prompt_ids[b if b < B_real else 0], np.int32)  # filler rows copy prompt 0
            ids_BxT[b, T - len(p) :] = p
            start_B[b] = T - len(p)
            rows_B[b] = rows[b] if b < B_real else rows[0]
        args = [ids_BxT, start_B, rows_B]
        if self.mesh is not None:
            args = [jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in args]
        prefill, _, _ = _compiled(settings)
        state = prefill(self.params, *args, jnp.uint32(sampling.seed), max_new=sampling.max_new_tokens)
        return state, B_real

    def generate_ids(
        self,
        prompt_ids: Sequence[np.ndarray],
        sampling: SamplingParams = SamplingParams(),
        *,
        return_logits: bool = False,
        rows: Sequence[int] | None = None,
    ) -> Generation:
        """Sample completions for a batch of tokenised prompts (any lengths) in one compiled loop.

        rows: the prompts' indices in the whole request (their PRNG streams; default 0..B-1).
        """
        settings = self._settings(sampling, return_logits)
        rows = list(range(len(prompt_ids))) if rows is None else list(rows)
        state, B = self._prefill(prompt_ids, sampling, settings, rows)
        state = _compiled(settings)[2](self.params, state)
        out = jax.device_get({k: state[k] for k in ("tokens", "lengths", "done", "all_logits") if k in state})
        return Generation(
            tokens=np.asarray(out["tokens"][:B]),
            lengths=np.asarray(out["lengths"][:B]),
            finished=np.asarray(out["done"][:B]),
            logits=np.asarray(out["all_logits"][:B]) if return_logits else None,
        )

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams = SamplingParams(), *,
                 batch_size: int = 32, max_prompt_length: int | None = None,
                 options=None) -> list[dict]:  # fmt: skip
        """Completions of text / message prompts, `batch_size` at a time (the last batch padded to the same
        shape); `options[k]`: prompt k's `tools` / `chat_template_kwargs`. Returns per prompt {"prompt",
        "completion" (text, special tokens dropped), "tokens", "finished"}."""
        ids = self.encode_prompts(prompts, max_prompt_length=max_prompt_length, options=options)
        out = []
        for lo in range(0, len(ids), batch_size):
            chunk = ids[lo : lo + batch_size]
            fill = [chunk[0]] * (min(batch_size, len(ids)) - len(chunk))  # one shape for every batch
            rows = list(range(lo, lo + len(chunk))) + [lo] * len(fill)
            gen = self.generate_ids(chunk + fill, sampling, rows=rows)
            for b in range(len(chunk)):
                toks = gen.completion_ids(b)
                out.append({
                    "prompt": prompts[lo + b],
                    "completion": self.decode(toks),
                    "tokens": toks.tolist(),
                    "finished": bool(gen.finished[b]),
                })  # fmt: skip
        return out

    def stream_ids(
        self, prompt_ids: np.ndarray, sampling: SamplingParams = SamplingParams()
    ) -> Iterator[int]:
        """Token ids of one completion as they are sampled (a jitted one-token step called per token)."""
        settings = self._settings(sampling, False)
        state, _ = self._prefill([prompt_ids], sampling, settings, [0])
        step = _compiled(settings)[1]
        for _ in range(sampling.max_new_tokens):
            state, tok_B = step(self.params, state)
            tok = int(jax.device_get(tok_B)[0])
            yield tok
            if tok in self.stop_ids:
                return

    def stream(self, prompt: Prompt, sampling: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text pieces of one completion as it decodes (decoded incrementally, so multi-byte characters
        split over tokens come out whole)."""
        ids = self.encode_prompts([prompt])[0]
        toks: list[int] = []
        shown = text = ""
        for tok in self.stream_ids(ids, sampling):
            toks.append(tok)
            text = self.decode(toks)
            if text.endswith("\ufffd"):  # maybe an incomplete UTF-8 sequence: wait for its next byte
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
            shown = text
        if len(text) > len(shown):  # whatever was held back (the output really ends mid-character)
            yield text[len(shown) :]


def step_cache_size(generator: Generator, sampling: SamplingParams) -> int:
    """How many programs the one-token step has compiled for these settings (a test hook: decoding any
    number of tokens must compile it once)."""
    step = _compiled(generator._settings(sampling, False))[1]
    return step._cache_size()


def read_prompts(path, *, with_options: bool = False):
    """Prompts from a file: JSONL with a "prompt" (text or messages) or "messages" field per line, or plain
    text with one prompt per non-empty line. `with_options`: (prompts, options), options[k] the line's
    `tools` / `chat_template_kwargs` fields (`jdpo.data.chat`; {} for none)."""
    lines = Path(path).read_text().splitlines()
    prompts: list[Prompt] = []
    options: list[dict] = []
    jsonl = path.__str__().endswith((".jsonl", ".json")) or (lines and lines[0].lstrip().startswith("{"))
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            options.append({})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        if not isinstance(value, str | list):
            raise ValueError(f'{path}:{n}: expected a "prompt" (text or messages) or "messages" field')
        if isinstance(value, list):
            value = as_messages(value, "prompt", f"{path}:{n}", "user")
        prompts.append(value)
        options.append(read_chat_fields(row, f"{path}:{n}"))
    return (prompts, options) if with_options else prompts
