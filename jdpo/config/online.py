"""The `online` section (online DPO, `dpo.online`: sampling, scoring and pairing every step), with its
rules. The reward function itself is imported and probed by `jdpo.train.online` when the data load,
before the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from jdpo.config.fields import ConfigError, setting

if TYPE_CHECKING:
    from jdpo.config.schema import Config


@dataclass(frozen=True)
class OnlineSection:
    """Online DPO (dpo.online true): sampling, scoring and pairing, every step (`jdpo.train.online`)."""

    reward: str = setting(
        "",
        "The reward: 'module:function' or 'path/to/file.py:function', called as fn(prompts, completions) "
        "(lists of strings) and returning one finite float per completion.",
    )
    samples_per_prompt: int = setting(4, "Completions sampled per prompt (>= 2); the pair is best vs worst.")
    prompts_per_step: int = setting(8, "Prompts sampled per optimizer step (the step's pairs at most).")
    temperature: float = setting(1.0, "Sampling temperature (> 0: equal greedy samples would always tie).")
    top_p: float = setting(1.0, "Nucleus sampling: keep the smallest set of tokens with this mass (1: off).")
    max_new_tokens: int = setting(64, "Tokens sampled per completion at most (the stop token included).")
    reward_timeout: float = setting(
        600.0,
        "Seconds one call of the reward may take (0: no bound); past it, or when the reward raises or scores "
        "badly, the run checkpoints its last step and stops naming the error.",
    )


def check_online(cfg: Config) -> None:
    on, d = cfg.online, cfg.dpo
    if not d.online:
        return
    if d.reference == "cached":
        raise ConfigError(
            "dpo.online samples new completions every step, so their reference log-probs cannot be cached "
            "before training: set dpo.reference online (a frozen copy of the initial weights; under LoRA the "
            "base with the initial adapters, no copy) or none (reference-free losses)"
        )
    if cfg.train.rounds > 1:
        raise ConfigError(
            f"train.rounds={cfg.train.rounds} with dpo.online: rounds are passes over a fixed pair set; an "
            "online run samples new pairs every step. Use dpo.ref_update hard with dpo.ref_update_every "
            "(the policy becomes the reference every N steps) instead"
        )
    if d.unpaired:
        raise ConfigError(f"dpo.online trains on best-vs-worst pairs: dpo.loss_type {d.loss_type[0]} takes "
                          "rated examples; use a pair loss (e.g. sigmoid)")  # fmt: skip
    module, _, name = on.reward.rpartition(":")
    if not module or not name:
        raise ConfigError(
            f"online.reward={on.reward!r} must be 'module:function' (or 'path/to/file.py:function'), e.g. "
            "jdpo.demo:sum_reward"
        )
    for field_name, value, lo in [
        ("online.samples_per_prompt", on.samples_per_prompt, 2),
        ("online.prompts_per_step", on.prompts_per_step, 1),
        ("online.max_new_tokens", on.max_new_tokens, 1),
    ]:
        if value < lo:
            raise ConfigError(f"{field_name} must be >= {lo}, got {value}")
    if on.temperature <= 0:
        raise ConfigError(f"online.temperature must be > 0 (greedy samples of one prompt are all equal and "
                          f"always tie), got {on.temperature}")  # fmt: skip
    if not 0 < on.top_p <= 1:
        raise ConfigError(f"online.top_p must be in (0, 1], got {on.top_p}")
    if not on.reward_timeout >= 0:
        raise ConfigError(f"online.reward_timeout must be >= 0 s (0: no bound), got {on.reward_timeout}")
