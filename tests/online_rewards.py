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


# `misbehaving`: its MISBEHAVE["at_call"]-th call after the probe (step 3's with the default) misbehaves
# as MISBEHAVE["how"] says: "exit" raises SystemExit(0), "raise" a RuntimeError, "inf" scores inf, "hang"
# sleeps HANG seconds, "sigterm" sends this process SIGTERM and then sleeps HANG seconds.
MISBEHAVE = {"at_call": 3, "how": "exit"}
HANG = 20.0
_CALLS = [0]


def misbehaving(prompts, completions):
    import os
    import signal
    import time

    if list(completions) == ["", "a", "ab"]:  # the probe (one per Trainer): count this trainer's calls
        _CALLS[0] = 0
        return [0.0, 1.0, 2.0]
    _CALLS[0] += 1
    if _CALLS[0] == MISBEHAVE["at_call"]:
        how = MISBEHAVE["how"]
        if how == "exit":
            raise SystemExit(0)
        if how == "raise":
            raise RuntimeError("the verifier is down")
        if how == "inf":
            return [math.inf] * len(completions)
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(HANG)
    return [float(len(c)) for c in completions]
