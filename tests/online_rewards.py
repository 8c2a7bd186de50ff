"""Reward functions for tests/test_online.py (`online.reward: online_rewards:<name>`; tests/ is on sys.path
under pytest). Each takes the prompts and completions as lists of strings."""

from __future__ import annotations

import math

CALLS: list[tuple[list[str], list[str]]] = []  # every call of `recorded`


def constant(prompts, completions):
    return [0.5] * len(completions)


def length(prompts, completions):
    """Longer is better: the chosen sample is the longest text, the rejected the shortest."""
    return [float(len(c)) for c in completions]


def recorded(prompts, completions):
    CALLS.append((list(prompts), list(completions)))
    return [float(len(c)) for c in completions]


def too_few(prompts, completions):
    return [0.0] * (len(completions) - 1)


def nan_score(prompts, completions):
    return [math.nan] + [0.0] * (len(completions) - 1)


def text_scores(prompts, completions):
    return ["good"] * len(completions)


def scalar(prompts, completions):
    return 1.0


def raises(prompts, completions):
    raise RuntimeError("the verifier is down")


not_a_function = 3


def nan_after_the_probe(prompts, completions):
    """Passes the probe (its completions are "", "a", "ab"), then scores NaN: checked at every call."""
    if list(completions) == ["", "a", "ab"]:
        return [0.0, 0.0, 0.0]
    return [math.nan] * len(completions)
