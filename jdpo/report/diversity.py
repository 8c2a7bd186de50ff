"""Sample diversity: distinct-n (Li et al. 2016), the fraction of distinct n-grams among all n-grams.

    distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4     # (1,2) (2,3) (1,2) (2,4)

Pooled over the samples (the n-grams of every sample together, none crossing two samples), so a policy
that collapses to one answer scores low however long its answer is. Plain Python over token ids (or any
hashable items): `jdpo eval` and online sampling call it on generated completions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    """The n-grams of one sequence, in order ([] when it is shorter than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = list(tokens)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Iterable[Sequence], n: int) -> float:
    """Distinct n-grams / all n-grams over `samples` (sequences of tokens); NaN when they hold no n-gram."""
    seen: set[tuple] = set()
    total = 0
    for sample in samples:
        grams = ngrams(sample, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


def diversity_metrics(samples: Sequence[Sequence], prefix: str = "") -> dict[str, float]:
    """{prefix + "distinct_1", prefix + "distinct_2"} of `samples`."""
    samples = [list(s) for s in samples]
    return {f"{prefix}distinct_{n}": distinct_n(samples, n) for n in (1, 2)}
