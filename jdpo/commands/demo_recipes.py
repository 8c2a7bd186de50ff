"""The demo's recipes (`jdpo demo --recipe`): the settings each adds to the preset's DPO stage.

Apart from `jdpo.demo` so that the command line lists them without importing the demo (which loads JAX,
the trainer and transformers: ~4 s, and PyTorch with it where it is installed).
"""

from __future__ import annotations

from typing import Any

RECIPES = ("offline", "iterative", "online")
# Iterative DPO: the preset's ~200 steps as 6 passes over the pairs (31 steps each), the policy becoming
# the reference after each pass (a new cached reference pass per round).
ITERATIVE_STAGE = {"train.rounds": 6, "train.max_steps": 0, "train.num_epochs": 1.0}
ONLINE_STAGE = {
    "dpo.online": True,
    "dpo.reference": "online",  # the online samples' reference log-probs come from a frozen copy
    "online.reward": "jdpo.demo:sum_reward",
    "online.samples_per_prompt": 4,
    "online.prompts_per_step": 16,
    "online.temperature": 1.0,
    "online.max_new_tokens": 4,  # "82</s>" is 3 tokens; a 4th lets an answer run on (and be wrong)
}


def recipe_overrides(recipe: str) -> dict[str, Any]:
    """The settings a recipe adds to the preset's DPO stage (one branch per recipe)."""
    if recipe == "offline":
        return {}
    if recipe == "iterative":
        return dict(ITERATIVE_STAGE)
    if recipe == "online":
        return dict(ONLINE_STAGE)
    raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
