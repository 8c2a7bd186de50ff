"""Tokenisation of preference records with exact prompt / completion boundaries.

Per pair we produce `prompt_ids`, `chosen_ids`, `rejected_ids` (int32). The model sees
`prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`. The prompt is tokenised once and each
completion separately, so no token ever spans the boundary (a BPE merge across it would let the prompt
"leak" a completion token or shift the scored span).

Rules (tested in tests/test_data_tokenize.py):
- BOS: exactly one at the start of the prompt when the tokenizer adds one (its `add_special_tokens=True`
  output starts with bos) or when a chat template writes it into the text; never two.
- Text records: completion = tokens of the completion text + the tokenizer's EOS.
- Message records: rendered with the tokenizer's chat template; prompt = template(prompt turns,
  add_generation_prompt=True); completion = the text the template adds for the assistant turn(s), so it
  ends with the template's own end-of-turn token(s) (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...),
  which is what generation stops on. Whitespace the template writes after that last special token is
  dropped (never generated). If the rendered completion holds no special token, the tokenizer's EOS is
  appended. Without a chat template messages are rendered as "\\n\\nHuman: ...\\n\\nAssistant: ..." text.
- Template arguments (`jdpo.data.chat`): every render gets `chat_template_kwargs` (the run's
  `data.chat_template_kwargs`) with the record's own `chat_template_kwargs` over it, and the record's
  `tools` as `tools=`; prompt and completion are rendered with the same ones, so a Qwen3 template's
  `enable_thinking: false` puts its empty think block in the prompt, and tool definitions sit in the
  prompt. Tool calls, tool results and reasoning traces (`reasoning_content`) render where the template
  puts them: a completion keeps its reasoning, so chosen and rejected may differ in it. A record using
  one the template does not render is refused (`DataError` naming its file and line, not skipped by
  `skip_bad_rows`: it is the tokenizer that is wrong for the data); so is a template that renders the
  prompt differently once a completion with tool calls or reasoning follows it.
- Tokenizers that treat the start of a text specially (SentencePiece's dummy "▁" prefix, Llama-2 style)
  get their completions encoded after a "\\n" anchor that is then removed, so completion tokens are the
  ones the text has in context after the prompt.
- Truncation: the prompt is cut from the left to `max_prompt_length` (its end is kept; a leading BOS is
  kept too), completions from the right to `max_length - len(prompt)`. A pair with no room left for a
  completion, an empty completion, or chosen == rejected (before or after truncation) is dropped and
  counted in the report.

`encode_prompts` is the prompt side on its own (for generation): the same rendering, BOS and truncation
code that `tokenize_preferences` runs on a record's prompt, so a prompt generates from the ids it was
trained with. `end_of_turn_id` is the token a chat completion ends with (a stop token for generation).
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jdpo.data.chat import TemplateFeatures, features_used, message_is_empty, template_kwargs
from jdpo.data.records import record_locations
from jdpo.data.sources import DataError

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class TokenizedPairs:
    """Tokenised pairs; pair k (its `pair_id`) is `pairs[k]`. `source_index[k]` is its record index.
    `labels` [N] bool: unpaired examples (`jdpo.data.unpaired`: chosen = the rated completion, rejected =
    the mismatched KL completion), True = desirable; None for pairs."""

    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    source_index: np.ndarray
    labels: np.ndarray | None = None
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return {
            "prompt_ids": self.prompt_ids[k],
            "chosen_ids": self.chosen_ids[k],
            "rejected_ids": self.rejected_ids[k],
        }

    def lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt_N, chosen_N, rejected_N) token counts."""
        f = lambda xs: np.fromiter((len(x) for x in xs), dtype=np.int64, count=len(xs))  # noqa: E731
        return f(self.prompt_ids), f(self.chosen_ids), f(self.rejected_ids)

    def pair_lengths(self, shared_prompt: bool = False) -> np.ndarray:
        """Tokens a pair occupies in a packed row: (prompt + chosen) + (prompt + rejected); with
        `shared_prompt` (`jdpo.data.batching.make_batch`) the prompt once and its last token twice more."""
        p, c, r = self.lengths()
        if shared_prompt:
            return np.where(p > 1, p + 1, 2 * p) + c + r
        return 2 * p + c + r

    def fingerprint(self) -> str:
        """A content hash of all token ids (for cache keys: same pairs in the same order -> same hash).
        Computed once and remembered (the pairs are not meant to be modified)."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.sha256()
        p, c, r = self.lengths()
        h.update(np.stack([p, c, r]).astype(np.int64).tobytes())
        for xs in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            if len(xs):
                h.update(np.concatenate(xs).astype(np.int32).tobytes())
        if self.labels is not None:
            h.update(b"labels" + np.asarray(self.labels, np.uint8).tobytes())
        return h.hexdigest()


@dataclass
class TokenizeReport:
    """Counts and length statistics of one tokenisation; `str(report)` is a printable summary."""

    pairs_read: int = 0
    pairs_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> pairs
    prompts_truncated: int = 0
    completions_truncated: int = 0  # pairs with chosen or rejected cut
    template_fallbacks: int = 0  # chat template output not prefix-stable; completion rendered alone
    bad_examples: list[str] = field(default_factory=list)  # first records the chat template rejected
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    pair_length_percentiles: dict[int, float] = field(default_factory=dict)  # 2*prompt + chosen + rejected
    sequence_length_percentiles: dict[int, float] = field(default_factory=dict)  # prompt + completion

    @property
    def tokens(self) -> int:
        """Tokens the model reads per epoch: the prompt twice (once per completion) plus completions."""
        return 2 * self.prompt_tokens + self.chosen_tokens + self.rejected_tokens

    def __str__(self) -> str:
        pct = lambda d: ", ".join(f"p{k}={v:.0f}" for k, v in d.items())  # noqa: E731
        lines = [
            f"tokenised {self.pairs_kept} of {self.pairs_read} pairs",
            f"  tokens: {self.tokens} (prompt {self.prompt_tokens}, chosen {self.chosen_tokens}, "
            f"rejected {self.rejected_tokens})",
            f"  truncated: {self.prompts_truncated} prompts, {self.completions_truncated} completion pairs",
            f"  pair length (2*prompt+chosen+rejected): {pct(self.pair_length_percentiles)}",
            f"  sequence length (prompt+completion): {pct(self.sequence_length_percentiles)}",
        ]
        if self.template_fallbacks:
            lines.append(f"  chat template not prefix-stable for {self.template_fallbacks} completions")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {n}: {reason}")
        lines.extend(f"    e.g. {e}" for e in self.bad_examples)
        return "\n".join(lines)


def account_split(
    split: str,
    report: TokenizeReport,
    *,
    too_long: int,
    row_length: int,
    source: str,
    load_dropped: Mapping[str, int] | None = None,
) -> str | None:
    """One line on what a split lost before training: pairs dropped (by reason, `too_long` of them for
    not fitting a row of `row_length` tokens) and pairs truncated; None when it lost nothing.
    Raises `DataError` saying why when no pair is left (`source`: where the split came from, in words).
    `split` is "train" or "eval"; `load_dropped`: rows the format reader dropped (`LoadReport.dropped`)."""
    load_dropped = Counter(load_dropped or {})
    dropped = [f"{n} ({reason})" for reason, n in sorted((load_dropped + report.dropped).items())]
    if too_long:
        dropped.append(f"{too_long} (longer than a row of {row_length} tokens: raise data.row_length)")
    truncated = []
    if report.prompts_truncated:
        truncated.append(f"{report.prompts_truncated} prompts (data.max_prompt_length)")
    if report.completions_truncated:
        truncated.append(f"{report.completions_truncated} completion pairs (data.max_length)")
    kept = report.pairs_kept - too_long
    line = f"{split} data: {kept} of {report.pairs_read + sum(load_dropped.values())} pairs kept"
    for what, items in (("dropped", dropped), ("truncated", truncated)):
        if items:
            line += f"; {what} " + ", ".join(items)
    if kept <= 0:
        use = "train on" if split == "train" else "evaluate on"
        raise DataError(f"{source}: no pairs left to {use}. {line}")
    return line if dropped or truncated else None


def _is_messages(x: Any) -> bool:
    return isinstance(x, list)


def _empty(x: Any) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(message_is_empty(m) for m in x)


_PLAIN_ROLES = ("system", "user", "assistant")


def render_plain(messages: list[dict]) -> str:
    """Messages as hh-rlhf style text, for tokenizers without a chat template (base models). Other roles
    than system / user / assistant have no plain form: a ValueError, rather than a turn written as
    someone else's."""
    out = []
    for m in messages:
        if m["role"] not in _PLAIN_ROLES:
            raise ValueError(
                f"role {m['role']!r} has no plain-text form (the tokenizer has no chat template; without "
                "one only system, user and assistant turns can be written): use a tokenizer with a chat "
                "template, or drop those turns"
            )
        if m["role"] == "system":
            out.append(m["content"])
        else:
            out.append(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
    return "".join(out)


_HEAD = "\n\nAssistant:"


def _plain_completion(messages: list[dict]) -> str:
    text = render_plain(messages)
    return text[len(_HEAD) :] if text.startswith(_HEAD) else text


class _Renderer:
    """Turns a record into (prompt_text, chosen_text, rejected_text, is_chat)."""

    def __init__(self, tokenizer: Any, chat_template_kwargs: Mapping | None = None):
        self.tok = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.special = sorted(
            {t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True
        )
        self.fallbacks = 0
        self.kwargs = dict(chat_template_kwargs or {})
        self.features = TemplateFeatures(self._render)

    def _render(self, messages: list[dict], generation_prompt: bool, kwargs: Mapping) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    def _template(self, messages: list[dict], generation_prompt: bool, options: Mapping | None = None) -> str:
        return self._render(messages, generation_prompt, self.kwargs if options is None else options)

    def options(self, record: Mapping | None) -> dict:
        """The template's keyword arguments for `record` (`chat.template_kwargs`)."""
        return template_kwargs(self.kwargs, record)

    def refusal(self, parts: list, options: Mapping, chat: bool) -> str | None:
        """Why the template cannot render what these message lists / options use (None: it can)."""
        used = features_used(parts, options)
        if chat and self.has_template:
            return self.features.problem(parts, options) if used else None
        used = [u for u in used if u != "tool results"]  # plain text refuses a tool turn (`render_plain`)
        if not used:
            return None
        what = "text records" if self.has_template else "the tokenizer has no chat template; it"
        return (
            f"{', '.join(used)} need a chat template and message records ({what} cannot show them): "
            "use message lists and a tokenizer with a chat template that renders them"
        )

    def _completion(
        self, prompt: list[dict], prompt_text: str, completion: list[dict], options: Mapping | None = None
    ) -> str:
        full = self._template(prompt + completion, False, options)
        if full.startswith(prompt_text):
            text = full[len(prompt_text) :]
        elif features_used([completion], {}):
            raise ValueError(
                "the template renders the prompt differently once this completion follows it (not "
                "prefix-stable), so its tool calls / reasoning cannot be split from the prompt exactly "
                "(e.g. Qwen3's enable_thinking: false with a reasoning_content: the prompt then ends with an "
                "empty think block the completion does not continue)"
            )
        else:
            # Templates that rewrite earlier turns (e.g. drop reasoning) are not prefix-stable; fall back
            # to the completion content, which still gets an EOS.
            self.fallbacks += 1
            text = "".join(m["content"] for m in completion)
        stripped = text.rstrip()
        if stripped != text and any(stripped.endswith(s) for s in self.special):
            text = stripped  # whitespace after the end-of-turn token is never generated
        return text

    def prompt(self, prompt: str | list[dict], options: Mapping | None = None) -> str:
        """The text of a prompt: text as is; messages through the chat template with
        add_generation_prompt=True (an empty list renders as ""), or without a template as plain turns
        ending with the assistant header (the completion then starts with its space). `options`: the
        template's keyword arguments (default: the run's)."""
        if not _is_messages(prompt):
            return prompt
        if not self.has_template:
            return render_plain(prompt) + _HEAD
        return self._template(prompt, True, options) if prompt else ""

    def __call__(self, rec: dict) -> tuple[str, str, str, bool]:
        prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
        chat = _is_messages(chosen) or _is_messages(prompt)
        options = self.options(rec)
        if not chat:
            return self.prompt(prompt), chosen, rejected, False
        as_msgs = lambda x, role: x if isinstance(x, list) else [{"role": role, "content": x}]  # noqa: E731
        prompt, chosen, rejected = (
            as_msgs(prompt, "user"),
            as_msgs(chosen, "assistant"),
            as_msgs(rejected, "assistant"),
        )
        p = self.prompt(prompt, options)
        if not self.has_template:
            return p, _plain_completion(chosen), _plain_completion(rejected), False
        c, r = (self._completion(prompt, p, x, options) for x in (chosen, rejected))
        return p, c, r, True


def bos_eos(tokenizer: Any) -> tuple[int | None, bool, int | None]:
    """(bos_id, tokenizer adds bos, eos_id)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    wants = False
    if bos is not None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        wants = bool(with_special) and with_special[0] == bos
    return bos, wants, eos


def _encode(tokenizer: Any, texts: list[str], batch_size: int) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        out.extend(tokenizer(texts[i : i + batch_size], add_special_tokens=False)["input_ids"])
    return out


_ANCHOR = "\n"


def _needs_anchor(tokenizer: Any) -> bool:
    """True for tokenizers that treat the start of a text specially (SentencePiece's dummy prefix:
    "Hello" alone -> "▁Hello", but "\nHello" -> "\n", "Hello"). Their completions are encoded after an
    anchor that is then removed, so that they tokenise as they do in context after the prompt."""
    a = _encode(tokenizer, [_ANCHOR], 1)[0]
    alone, after = _encode(tokenizer, ["x", _ANCHOR + "x"], 2)
    return after[: len(a)] == a and after[len(a) :] != alone


def _encode_continuations(tokenizer: Any, texts: list[str], batch_size: int) -> list[list[int]]:
    """Token ids of texts that continue a prompt (see `_needs_anchor`)."""
    a = _encode(tokenizer, [_ANCHOR], 1)[0]
    out = _encode(tokenizer, [_ANCHOR + t for t in texts], batch_size)
    for i, ids in enumerate(out):
        # If the anchor merged with the text (never for byte-fallback "\n"), encode the text alone.
        out[i] = ids[len(a) :] if ids[: len(a)] == a else _encode(tokenizer, [texts[i]], 1)[0]
    return out


def _finish_completion(
    ids: list[int], chat: bool, *, bos: int | None, eos: int | None, special_ids: set[int]
) -> tuple[list[int], bool]:
    """(completion ids ending in EOS / end-of-turn, whether a leading BOS was removed)."""
    had_bos = bos is not None and bool(ids) and ids[0] == bos
    if had_bos:
        ids = ids[1:]  # a template that writes BOS into every render (only with an empty prompt)
    if eos is None:
        return ids, had_bos
    if chat:
        return (ids if any(t in special_ids for t in ids) else ids + [eos]), had_bos
    return (ids if ids and ids[-1] == eos else ids + [eos]), had_bos


@functools.lru_cache(maxsize=8)
def _longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` covers: its longest vocabulary entry (a byte-level
    entry is at least as long as the text it stands for)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def char_bound(tokenizer: Any, max_tokens: int) -> int:
    """How many characters of a text to keep when only its first (or last) `max_tokens` tokens are
    used: twice what `max_tokens` tokens can cover. A longer text is cut to this many characters before
    it is tokenised (a 60 MB line among short ones took 13.8 GB and two minutes whole); what is kept
    still holds at least 2 x `max_tokens` tokens, so the tokens kept after truncation are those of the
    whole text (the cut is far past them)."""
    longest = _longest_token_chars(tokenizer)
    return 2 * longest * int(max_tokens) + longest


def _prompt_tail(text: str, n: int, bos_text: str | None) -> str:
    """The last `n` characters of a rendered prompt (prompts are truncated from the left), keeping a
    leading BOS the template wrote as text (the truncation keeps it too)."""
    if len(text) <= n:
        return text
    head = bos_text if bos_text and text.startswith(bos_text) else ""
    return head + text[len(text) - n :]


def _prompt_ids(
    tokenizer: Any,
    texts: list[str],
    *,
    max_prompt_length: int | None,
    batch_size: int,
    bos_elsewhere: Sequence[bool] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of rendered prompt texts under the BOS and truncation rules (module docstring), and
    whether each was truncated. `bos_elsewhere[k]`: the chat template wrote a BOS outside prompt k's text
    (into its completion's render, which happens only for an empty prompt); the prompt gets it."""
    bos, wants_bos, _ = bos_eos(tokenizer)
    out, truncated = [], []
    for k, p in enumerate(_encode(tokenizer, texts, batch_size)):
        elsewhere = bos_elsewhere is not None and bos_elsewhere[k]
        has_bos = bos is not None and (wants_bos or elsewhere or (bool(p) and p[0] == bos))
        while bos is not None and p and p[0] == bos:
            p = p[1:]
        if has_bos:
            p = [bos] + p
        cut = max_prompt_length is not None and len(p) > max_prompt_length
        if cut:
            head = p[:1] if has_bos else []
            p = head + p[len(p) - (max_prompt_length - len(head)) :]
        out.append(p)
        truncated.append(cut)
    return out, truncated


def _check_prompt(prompt: Any, k: int) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        hint = " (a preference record? pass its 'prompt')" if isinstance(prompt, dict) else ""
        raise TypeError(
            f"prompt {k}: a prompt is a string or a list of {{'role': ..., 'content': ...}} messages, "
            f"got {type(prompt).__name__}{hint}"
        )
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TypeError(
                f"prompt {k}: message {i} must be a dict with 'role' and 'content' strings, got {m!r:.100}"
            )


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str | list[dict]],
    *,
    max_prompt_length: int | None = None,
    batch_size: int = 2048,
    chat_template_kwargs: Mapping | None = None,
    options: Sequence[Mapping | None] | None = None,
) -> list[np.ndarray]:
    """Token ids (int32) of prompts to generate from, built by the code that builds a record's prompt ids
    in `tokenize_preferences`: text as is; a message list through the tokenizer's chat template with
    add_generation_prompt=True (without a template: plain "\\n\\nHuman: ...\\n\\nAssistant:" turns, as
    training renders them); exactly one BOS when the tokenizer adds one or the template writes one; a
    prompt over `max_prompt_length` tokens keeps its end (and its BOS).

    A text prompt stays text, also where training made it a user turn (records whose completions are
    messages); pass `[{"role": "user", "content": text}]` for that prompt. Raises TypeError for a prompt
    that is neither, ValueError where the chat template rejects a message list or cannot render what it
    uses. `chat_template_kwargs`: the template's arguments (the run's `data.chat_template_kwargs`);
    `options[k]`: prompt k's row fields `tools` / `chat_template_kwargs` (`jdpo.data.chat`), as a record
    carries them.
    """
    if tokenizer is None:
        raise ValueError("encoding prompts needs a tokenizer")
    render = _Renderer(tokenizer, chat_template_kwargs)
    texts, bos_elsewhere = [], []
    for k, prompt in enumerate(prompts):
        _check_prompt(prompt, k)
        opts = render.options(options[k] if options is not None else None)
        refusal = render.refusal([prompt], opts, _is_messages(prompt))
        if refusal:
            raise ValueError(f"prompt {k}: {refusal}")
        try:
            texts.append(render.prompt(prompt, opts))
        except Exception as e:  # the template's own checks (role order, unknown roles, ...)
            raise ValueError(
                f"prompt {k}: the tokenizer's chat template rejected it ({type(e).__name__}: {e}); give the "
                "roles in an order the template accepts, or pass the prompt as text"
            ) from None
        # An empty message list renders as "": the BOS a template writes reaches it as in training, where
        # it arrives with the completion's render.
        bos_elsewhere.append(prompt == [] and render.has_template and _template_writes_bos(render))
    ids, _ = _prompt_ids(
        tokenizer,
        texts,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        bos_elsewhere=bos_elsewhere,
    )
    return [np.asarray(p, np.int32) for p in ids]


def prompt_texts(
    tokenizer: Any,
    prompts: Sequence[str | list[dict]],
    *,
    chat_template_kwargs: Mapping | None = None,
    options: Sequence[Mapping | None] | None = None,
) -> list[str]:
    """The text each prompt is encoded from by `encode_prompts` (same arguments): text as is, message
    lists through the chat template with the generation prompt (without a template: plain turns)."""
    render = _Renderer(tokenizer, chat_template_kwargs)
    return [
        render.prompt(p, render.options(options[k] if options is not None else None))
        for k, p in enumerate(prompts)
    ]


def _template_writes_bos(render: _Renderer) -> bool:
    bos = render.tok.bos_token_id
    ids = _encode(render.tok, [render._template([{"role": "user", "content": "x"}], True)], 1)[0]
    return bos is not None and bool(ids) and ids[0] == bos


def end_of_turn_id(tokenizer: Any, chat_template_kwargs: Mapping | None = None) -> int | None:
    """The special token an assistant turn ends with under the tokenizer's chat template (`<|im_end|>`,
    `<|eot_id|>`, ...: what a chat completion ends with in training and what generation stops on), or
    None without a chat template or when the turn ends with no special token."""
    render = _Renderer(tokenizer, chat_template_kwargs)
    if not render.has_template:
        return None
    prompt = [{"role": "user", "content": "hi"}]
    text = render._completion(prompt, render.prompt(prompt), [{"role": "assistant", "content": "a"}])
    encode = _encode_continuations if _needs_anchor(tokenizer) else _encode
    bos, _, eos = bos_eos(tokenizer)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids, _ = _finish_completion(
        encode(tokenizer, [text], 1)[0], True, bos=bos, eos=eos, special_ids=special_ids
    )
    return int(ids[-1]) if ids and ids[-1] in special_ids else None


def tokenize_preferences(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 2048,
    skip_bad_rows: bool = False,
    verbose: bool = False,
    keep_equal: bool = False,
    chat_template_kwargs: Mapping | None = None,
) -> tuple[TokenizedPairs, TokenizeReport]:
    """Tokenise records {"prompt", "chosen", "rejected"} (text or messages) with `tokenizer`.

    Args:
      tokenizer: a transformers tokenizer (fast ones tokenise in batches of `batch_size`).
      max_length: cap on prompt + completion per sequence (each of chosen and rejected).
      max_prompt_length: cap on the prompt; cut from the left.
      skip_bad_rows: drop (and count) records the chat template rejects (or, without a template, with a
        role plain text cannot show) instead of raising `DataError`. Errors name the record's file and
        line when `records` are `PreferenceRecords` (as `load_preferences` returns), else its index.
      keep_equal: keep records whose chosen == rejected (unpaired examples, whose "rejected" is another
        example's completion for the KL estimate: the same answer to another prompt is still a mismatch).
      chat_template_kwargs: arguments of every chat template render (`data.chat_template_kwargs`); a
        record's own `chat_template_kwargs` override them, its `tools` go as `tools=`.
    Returns (pairs, report). `pairs.source_index[k]` is the record index of pair k.
    """
    report = TokenizeReport(pairs_read=len(records))
    render = _Renderer(tokenizer, chat_template_kwargs)
    bos, _, eos = bos_eos(tokenizer)
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")

    keep, texts_p, texts_c, texts_r, chat_flags = _render_records(
        records, render, report, keep_equal, skip_bad_rows
    )
    report.template_fallbacks = render.fallbacks
    if max_length is not None:  # a huge text costs its tokens only up to a bound (see `char_bound`)
        n = char_bound(tokenizer, max_length)
        texts_c, texts_r = [t[:n] for t in texts_c], [t[:n] for t in texts_r]
        n_prompt = char_bound(tokenizer, max_prompt_length or max_length)
        texts_p = [_prompt_tail(t, n_prompt, getattr(tokenizer, "bos_token", None)) for t in texts_p]

    encode_completions = _encode_continuations if _needs_anchor(tokenizer) else _encode
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    finish = functools.partial(_finish_completion, bos=bos, eos=eos, special_ids=special_ids)
    done_c = list(map(finish, encode_completions(tokenizer, texts_c, batch_size), chat_flags))
    done_r = list(map(finish, encode_completions(tokenizer, texts_r, batch_size), chat_flags))
    ids_p, cut_p = _prompt_ids(
        tokenizer,
        texts_p,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        bos_elsewhere=[c_bos or r_bos for (_, c_bos), (_, r_bos) in zip(done_c, done_r, strict=True)],
    )
    report.prompts_truncated = sum(cut_p)

    out_p, out_c, out_r, out_src = [], [], [], []
    for j, i in enumerate(keep):
        p, (c, _), (r, _) = ids_p[j], done_c[j], done_r[j]
        if max_length is not None:
            room = max_length - len(p)
            if room < 1:
                report.dropped["prompt leaves no room for a completion within max_length"] += 1
                continue
            if len(c) > room or len(r) > room:
                report.completions_truncated += 1
                c, r = c[:room], r[:room]
        if c == r and not keep_equal:
            report.dropped["chosen == rejected after tokenisation / truncation"] += 1
            continue
        out_p.append(np.asarray(p, np.int32))
        out_c.append(np.asarray(c, np.int32))
        out_r.append(np.asarray(r, np.int32))
        out_src.append(i)

    pairs = TokenizedPairs(out_p, out_c, out_r, np.asarray(out_src, np.int64))
    _length_stats(report, pairs)
    if verbose:
        print(report)
    return pairs, report


def _render_records(records, render, report: TokenizeReport, keep_equal: bool, skip_bad_rows: bool):
    """Each usable record as (prompt, chosen, rejected) text through the chat template (or plain text);
    empty / equal completions and records the template rejects are dropped and counted (or raise)."""
    where = record_locations(records)
    keep, texts_p, texts_c, texts_r, chat_flags = [], [], [], [], []
    for i, rec in enumerate(records):
        if _empty(rec["chosen"]) or _empty(rec["rejected"]):
            report.dropped["empty completion"] += 1
            continue
        if rec["chosen"] == rec["rejected"] and not keep_equal:
            report.dropped["chosen == rejected"] += 1
            continue
        parts = [rec["prompt"], rec["chosen"], rec["rejected"]]
        refusal = render.refusal(parts, render.options(rec), any(map(_is_messages, parts)))
        if refusal:  # the tokenizer is wrong for the data: never skipped as a bad row
            raise DataError(f"{where[i]}: {refusal}")
        try:
            p, c, r, chat = render(rec)
        except Exception as e:  # the template's own checks (role order, unknown roles, ...)
            if render.has_template:
                err = DataError(
                    f"{where[i]}: the chat template failed on this record: {type(e).__name__}: {e}"
                )
            else:  # a role `render_plain` cannot write
                err = DataError(f"{where[i]}: {e}")
            if not skip_bad_rows:
                raise err from None
            report.dropped["chat template error" if render.has_template else "role without a plain form"] += 1
            if len(report.bad_examples) < 5:
                report.bad_examples.append(str(err))
            continue
        keep.append(i)
        texts_p.append(p)
        texts_c.append(c)
        texts_r.append(r)
        chat_flags.append(chat)
    return keep, texts_p, texts_c, texts_r, chat_flags


def _length_stats(report: TokenizeReport, pairs: TokenizedPairs) -> None:
    """The kept pairs' token counts and length percentiles, into `report`."""
    report.pairs_kept = len(pairs)
    lp, lc, lr = pairs.lengths()
    report.prompt_tokens, report.chosen_tokens, report.rejected_tokens = (
        int(lp.sum()),
        int(lc.sum()),
        int(lr.sum()),
    )
    if len(pairs):
        seq = np.concatenate([lp + lc, lp + lr])
        report.pair_length_percentiles = {q: float(np.percentile(2 * lp + lc + lr, q)) for q in PERCENTILES}
        report.sequence_length_percentiles = {q: float(np.percentile(seq, q)) for q in PERCENTILES}
