"""The `data` section: preference sources and how they become fixed-shape batches, with its rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jdpo.config.fields import ConfigError, FrozenMapping, setting


@dataclass(frozen=True)
class DataSection:
    """Preference data sources and how they become fixed-shape batches."""

    train: tuple[str, ...] = setting(
        (), "Train sources: files, save_to_disk dirs or hub names; 'src:5000' or 'src:0.25' to sub-sample."
    )
    eval: tuple[str, ...] = setting((), "Held-out sources; empty means carve eval_fraction out of train.")
    eval_fraction: float = setting(0.0, "Fraction of train pairs held out for eval when `eval` is empty.")
    format: str = setting(
        "auto", "Record format: auto, standard, implicit_prompt, conversational, hh-rlhf, shp, oasst1."
    )
    max_length: int = setting(1024, "Max tokens of prompt + one completion; longer pairs are truncated.")
    max_prompt_length: int = setting(512, "Max prompt tokens; longer prompts keep their end.")
    row_length: int = setting(
        0, "Tokens per packed row (0: max_length * 2, room for a chosen+rejected pair)."
    )
    packing: bool = setting(True, "Pack several pairs per row; false puts one pair per row (length buckets).")
    shared_prompt: Literal["auto", "true", "false"] = setting(
        "auto",
        "Lay a pair's prompt out once, chosen and rejected as two branches after it (fewer tokens, same "
        "log-probs): auto (on where the attention kernel runs it), true, false.",
    )
    skip_bad_rows: bool = setting(False, "Skip malformed rows (count and print them) instead of stopping.")
    token_cache: bool = setting(
        True,
        "Keep the tokenised splits beside the reference cache (dpo.cache_dir), keyed by the tokenizer, "
        "template, data files and length settings, so a resume or a second run does not tokenise again.",
    )
    chat_template_kwargs: FrozenMapping = setting(
        FrozenMapping(),
        "Arguments of every chat template render (training, reference, eval, online sampling), e.g. "
        "{enable_thinking: false} for Qwen3; a row's own chat_template_kwargs field overrides them.",
    )


def check_data(data: DataSection) -> None:
    if not 0.0 <= data.eval_fraction <= 0.99:
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} is outside [0.0, 0.99]")
    if data.max_prompt_length >= data.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({data.max_prompt_length}) must be < data.max_length "
            f"({data.max_length}) to leave room for the completion"
        )
