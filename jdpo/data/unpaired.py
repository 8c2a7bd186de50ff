"""Unpaired feedback: records {"prompt", "completion", "label"} (format "unpaired", thumbs up / down on
single answers) and the examples the unpaired losses (`jdpo.kto_loss`: kto, bco, apo_zero_unpaired) read.

`to_examples` puts one split's rated examples (pairs split into a desirable and an undesirable one) into
the pair layout, so tokenisation, packing, the reference cache and the forward are those of pairs:
example i is (prompt_i + completion_i, prompt_i + the completion `kl_mismatch_order` gives it), the second
being what KTO's KL estimate is taken over. The examples are shuffled by the seed first, so the two halves
of one pair never meet as a mismatch; the rotation is over the split and fixed for the run, so the KL
completions' reference log-probs are cached with the rest. `check_classes` refuses a one-class split for
KTO and BCO, accepts it for apo_zero_unpaired (`ONE_CLASS` says why for each), and warns when the class
ratio leaves the range the KTO paper recommends.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from jdpo.data.chat import chat_fields
from jdpo.data.records import as_messages, get_field, is_unpaired
from jdpo.data.sources import DataError
from jdpo.data.tokenize import tokenize_preferences

log = logging.getLogger(__name__)

UNPAIRED_FORMAT = "unpaired"
# The KTO paper's advice: lambda_D n_D / (lambda_U n_U) in [1, 4/3].
RATIO_RANGE = (1.0, 4.0 / 3.0)
_TRUE, _FALSE = ("true", "1.0"), ("false", "0.0")  # CSV cells (text); 1.0 / 0.0: a pandas-written bool


def is_unpaired_row(row: dict) -> bool:
    """A row in the unpaired format: it has a completion and no chosen / rejected (a missing label is then
    reported as such by `read_unpaired_row`)."""
    return "completion" in row and not ({"chosen", "rejected"} & set(row))


def _label(row: dict, where: str) -> bool:
    if "label" not in row:
        raise DataError(f"{where}: missing field 'label' (fields present: {sorted(row)}); an unpaired record "
                        "needs label true (desirable) or false (undesirable)")  # fmt: skip
    value = row["label"]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: field 'label' must be true or false (desirable or not), got {value!r}")


def read_unpaired_row(row: dict, where: str, opts: dict) -> dict:
    """One row of the unpaired format -> {"prompt", "completion", "label": bool}. Prompt and completion are
    text or message lists; the label a JSON / parquet boolean or true / false in a CSV cell (True:
    desirable). Anything else is a DataError naming the row and field."""
    label = _label(row, where)
    prompt, completion = row.get("prompt", ""), get_field(row, "completion", where)
    prompt = "" if prompt is None else prompt
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion, "label": label}
    prompt = [] if isinstance(prompt, str) and not prompt else as_messages(prompt, "prompt", where, "user")
    completion = as_messages(completion, "completion", where, "assistant")
    n = len(prompt)
    if n and completion[:n] == prompt:  # the completion repeats the prompt turns (as UltraFeedback does)
        completion = completion[n:]
    return {"prompt": prompt, "completion": completion, "label": label}


def split_pairs(records: Sequence[dict]) -> tuple[list[dict], np.ndarray]:
    """Records (unpaired or pairs, mixed) -> unpaired {"prompt", "completion"} and their labels [n] bool:
    a pair gives its chosen completion (desirable) then its rejected one (undesirable)."""
    out, labels = [], []
    for rec in records:
        if is_unpaired(rec):
            out.append({"prompt": rec["prompt"], "completion": rec["completion"], **chat_fields(rec)})
            labels.append(bool(rec["label"]))
        else:
            out.append({"prompt": rec["prompt"], "completion": rec["chosen"], **chat_fields(rec)})
            out.append({"prompt": rec["prompt"], "completion": rec["rejected"], **chat_fields(rec)})
            labels.extend((True, False))
    return out, np.asarray(labels, bool)


def _as_kind(completion: Any, prompt: Any) -> Any:
    """A completion in the kind (text or messages) of the prompt it is paired with."""
    if isinstance(prompt, list) and isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(prompt, str) and isinstance(completion, list) and prompt:
        return "".join(m["content"] for m in completion)
    return completion


def kl_mismatch_order(n: int) -> np.ndarray:
    """For a group of n examples, the index of the completion each prompt is paired with for KTO's KL
    estimate: ``order[i] = (i - 1) mod n``, the completions rotated by one as TRL's KTOTrainer does. No
    example keeps its own completion for any n >= 2, odd or even (a reversal would leave the middle of an
    odd group matched). Use: ``kl_completions = completions[order]``.

    Raises ValueError for n < 2: a single example can only be paired with its own completion.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"kl_mismatch_order: n must be an int, got {n!r}")
    if n < 2:
        raise ValueError(
            f"kl_mismatch_order needs n >= 2 examples, got {n}: a single example would be paired with its "
            "own completion, so the KL term would equal the example's own reward"
        )
    return (np.arange(n) - 1) % n


def to_examples(records: Sequence[dict], *, seed: int) -> tuple[list[dict], np.ndarray]:
    """One split's records -> (pair-layout examples {"prompt", "chosen", "rejected"}, labels [n] bool):
    chosen is the example's own completion, rejected the mismatched one for the KL estimate (module
    docstring). Shuffled by `seed`. Raises DataError for fewer than 2 examples (no mismatch exists)."""
    unpaired, labels = split_pairs(records)
    if len(unpaired) < 2:
        raise DataError(
            f"{len(unpaired)} unpaired example(s): the KL estimate pairs each prompt with another example's "
            "completion, so at least 2 are needed"
        )
    perm = np.random.default_rng([seed, 14]).permutation(len(unpaired))
    unpaired, labels = [unpaired[i] for i in perm], labels[perm]
    kl_of = kl_mismatch_order(len(unpaired))
    examples = [
        {"prompt": u["prompt"], "chosen": u["completion"],
         "rejected": _as_kind(unpaired[j]["completion"], u["prompt"]), **chat_fields(u)}
        for u, j in zip(unpaired, kl_of.tolist(), strict=True)
    ]  # fmt: skip
    return examples, labels


# What each unpaired loss does with a split of one class (all labels true, or all false).
ONE_CLASS = {
    "kto": "refused: its value is measured against z_0, the policy's KL to the reference on mismatched "
    "completions, and with one class every example moves the same way relative to it (all up or all "
    "down), so it learns no preference",
    "bco": "refused: it trains a classifier of desirable vs undesirable rewards shifted by delta, the "
    "running mean of the rewards; with one class there is nothing to separate, delta follows the "
    "rewards, and every step pushes all log-ratios the same way without bound",
    "apo_zero_unpaired": "accepted: each example is anchored on the reference by itself (desirable ones "
    "pushed above it, undesirable ones below), so one class is a well-defined objective",
}


def check_classes(
    labels: np.ndarray,
    *,
    loss_type: str,
    desirable_weight: float,
    undesirable_weight: float,
    split: str,
    source: str | None = None,
) -> tuple[int, int]:
    """(n_desirable, n_undesirable) of a split's tokenised examples. Raises DataError (naming `source`,
    e.g. "data.train (a.jsonl)", else the split) when KTO or BCO gets only one class (`ONE_CLASS` says
    why per loss); warns (with the numbers and a fix) when the weighted ratio is outside [1, 4/3]."""
    n_d = int(np.sum(labels))
    n_u = int(len(labels) - n_d)
    if (n_d == 0 or n_u == 0) and ONE_CLASS.get(loss_type, "").startswith("refused"):
        have = "desirable" if n_u == 0 else "undesirable"
        why = ONE_CLASS[loss_type].removeprefix("refused: ")
        raise DataError(
            f"{source or f'the {split} data'}: only {have} examples ({n_d} desirable, {n_u} undesirable): "
            f"{loss_type.upper()} needs both labels (true and false): {why}. Add examples of the other "
            "label, or train with dpo.loss_type apo_zero_unpaired, which takes one class"
        )
    if n_d and n_u and undesirable_weight > 0:
        ratio = desirable_weight * n_d / (undesirable_weight * n_u)
        lo, hi = RATIO_RANGE
        if not lo <= ratio <= hi:
            best = undesirable_weight * n_u / n_d
            log.warning(
                "%s data: (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable) = "
                "(%g * %d) / (%g * %d) = %.3f is outside [1, 4/3], the range the KTO paper recommends; "
                "set dpo.desirable_weight to %.3g-%.3g (or dpo.undesirable_weight to balance)",
                split, desirable_weight, n_d, undesirable_weight, n_u, ratio, lo * best, hi * best,
            )  # fmt: skip
    return n_d, n_u


def tokenize_unpaired(records: Sequence[dict], tokenizer: Any, *, seed: int, **kwargs: Any):
    """`to_examples` then `jdpo.data.tokenize_preferences` (kwargs: max_length, max_prompt_length, ...):
    (TokenizedPairs with `labels`, TokenizeReport). An example whose KL completion equals its own (the same
    answer to another prompt) is kept: its prompt still differs."""
    examples, labels = to_examples(records, seed=seed)
    pairs, report = tokenize_preferences(examples, tokenizer, keep_equal=True, **kwargs)
    return dataclasses.replace(pairs, labels=labels[pairs.source_index]), report


def tokenizer_for(dpo: Any, *, seed: int, setting: str = "dpo.loss_type", use: str = "train"):
    """The tokenisation of a run's splits for its loss settings `dpo` (a `jdpo.config.DPOSection`):
    `tokenize_unpaired` for the unpaired losses, else `jdpo.data.tokenize_preferences` after refusing
    unpaired records (naming their sources, the loss `setting` to change, and what the loss was to do
    with them: `use`) before anything is tokenised."""
    if dpo.unpaired:
        return functools.partial(tokenize_unpaired, seed=seed)

    def tokenize_pairs(records: Sequence[dict], tokenizer: Any, **kwargs: Any):
        if any(is_unpaired(r) for r in records):
            report = getattr(records, "report", None)
            sources = [s for s, f in (report.formats.items() if report else ()) if f == UNPAIRED_FORMAT]
            raise DataError(
                f"{', '.join(sources) or 'the data'}: unpaired records (prompt / completion / label) cannot "
                f"{use} the pairwise loss {list(dpo.loss_type)}: set {setting} to kto, bco or "
                "apo_zero_unpaired"
            )
        return tokenize_preferences(records, tokenizer, **kwargs)

    return tokenize_pairs
