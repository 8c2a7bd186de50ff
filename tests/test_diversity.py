"""jdpo.report.diversity: distinct-n on hand-made token lists; jdpo.train.beta_schedule: the adaptive controller's rule."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jdpo.report.diversity import distinct_n, diversity_metrics, ngrams
from jdpo.train.beta_schedule import adaptive_beta, sequence_kl


def test_distinct_n_on_hand_made_lists():
    samples = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(samples, 1) == 4 / 6  # 1 2 3 4 among six tokens
    assert distinct_n(samples, 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert distinct_n(samples, 3) == 1.0  # (1,2,3), (1,2,4)
    # A collapsed policy: the same answer every time scores 1 / number of samples for long answers.
    assert distinct_n([[5, 6, 7, 8]] * 4, 1) == 4 / 16 and distinct_n([[5, 6, 7, 8]] * 4, 2) == 3 / 12
    # n-grams never cross two samples: [1] [2] has no bigram; a one-token-repeat sample has one type.
    assert math.isnan(distinct_n([[1], [2]], 2)) and math.isnan(distinct_n([], 1))
    assert distinct_n([[9, 9, 9, 9]], 1) == 1 / 4 and distinct_n([[9, 9, 9, 9]], 2) == 1 / 3
    assert ngrams(np.array([3, 4, 5]), 2) == [(3, 4), (4, 5)] and ngrams([3], 2) == []
    assert diversity_metrics([np.array([1, 2, 3]), np.array([1, 2, 4])], prefix="eval/") == {
        "eval/distinct_1": 4 / 6, "eval/distinct_2": 3 / 4}  # fmt: skip
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(samples, 0)


def test_adaptive_beta_moves_beta_toward_the_target_kl():
    beta = jnp.float32(0.1)
    # KL above the target: beta grows (the policy is held closer); below: it shrinks; on target: kept.
    assert float(adaptive_beta(beta, jnp.float32(1.1), 1.0, 0.1)) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert float(adaptive_beta(beta, jnp.float32(0.9), 1.0, 0.1)) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert float(adaptive_beta(beta, jnp.float32(1.0), 1.0, 0.1)) == pytest.approx(0.1)
    # The error is clipped to +-0.2 (Ziegler et al.): far off the target moves beta by 2% at gain 0.1.
    assert float(adaptive_beta(beta, jnp.float32(50.0), 1.0, 0.1)) == pytest.approx(0.1 * 1.02)
    assert float(adaptive_beta(beta, jnp.float32(-3.0), 1.0, 0.1)) == pytest.approx(0.1 * 0.98)
    assert float(adaptive_beta(beta, jnp.float32(jnp.nan), 1.0, 0.1)) == pytest.approx(0.1)
    assert adaptive_beta(beta, jnp.float32(2.0), 1.0, 0.1).dtype == jnp.float32


def test_sequence_kl_counts_both_completions_of_valid_pairs():
    pc, rc = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -9.0]])
    pr, rr = jnp.array([[-3.0, -4.0]]), jnp.array([[-2.0, -9.0]])
    valid = jnp.array([[1.0, 0.0]])  # the second slot is empty
    total, count = sequence_kl(pc, rc, valid, pr, rr)
    assert float(total) == pytest.approx(0.5 - 1.0) and float(count) == 2.0
    total, count = sequence_kl(pc, rc, valid)  # rated examples: the completion alone
    assert float(total) == pytest.approx(0.5) and float(count) == 1.0
