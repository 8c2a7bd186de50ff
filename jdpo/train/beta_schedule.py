"""The adaptive beta schedule (`dpo.beta_schedule: adaptive`): beta steered toward a target KL.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", section 2.2) adapt PPO's KL
coefficient with a proportional controller; DPO's beta plays the same part (a larger beta holds the policy
closer to the reference), so the same rule applies after every step t:

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_{t+1} = beta_t * (1 + K_beta * e_t)          (K_beta = 0.1 in the paper: `dpo.beta_gain`)

KL_t is the step's sequence-level KL estimate to the reference (`sequence_kl`): the mean over its
completions of log p_policy(y | x) - log p_ref(y | x). It is an unbiased estimate of KL(policy || ref)
when the completions are sampled from the policy (online DPO); on offline pairs it is the data's mean
log-ratio. Pure jax: the step calls both inside its jit, with beta in the train state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ERROR_CLIP = 0.2  # Ziegler et al.'s bound on the proportional error


def adaptive_beta(beta: Array, kl: Array, target_kl: float, gain: float) -> Array:
    """The next beta: beta * (1 + gain * clip(kl / target_kl - 1, -0.2, 0.2)), in beta's dtype. A
    non-finite KL leaves beta unchanged (the loop stops on the non-finite loss anyway)."""
    error = jnp.clip(kl / target_kl - 1.0, -ERROR_CLIP, ERROR_CLIP)
    new = beta * (1.0 + gain * error)
    return jnp.where(jnp.isfinite(kl), new, beta).astype(beta.dtype)


def sequence_kl(
    policy_chosen: Array,
    ref_chosen: Array,
    valid: Array,
    policy_rejected: Array | None = None,
    ref_rejected: Array | None = None,
) -> tuple[Array, Array]:
    """(sum over valid slots of the completions' log-ratios log p_policy - log p_ref, their count): both
    completions of a pair, or the rated completion alone (rejected None). The KL estimate is sum / count
    over a whole step (the caller sums over micro-batches first)."""
    valid = valid.astype(jnp.float32)
    total = jnp.sum(valid * (policy_chosen - ref_chosen))
    count = jnp.sum(valid)
    if policy_rejected is not None:
        total = total + jnp.sum(valid * (policy_rejected - ref_rejected))
        count = 2.0 * count
    return total, count
