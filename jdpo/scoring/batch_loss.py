"""The loss of a run's `LossSpec` on per-slot log-probs: what the train step and the eval pass share.

`slot_losses` maps the policy / reference log-probs of a batch's slots ([B, P] in the step, [N] over a
split in eval) to per-slot losses and metrics, for both batch kinds (`jdpo.data.batch`):

- pairs: `jdpo.dpo_loss`, each pair's loss weighted by its WPO weight with `wpo` (open-instruct's
  `wpo`: w = min(1, exp(mean token log-prob of chosen + of rejected)) under the policy, no gradient;
  logged as `wpo/weight_mean`), and bco_pair's reward shift the running reward mean of the train state;
- unpaired examples (loss_type kto / bco / apo_zero_unpaired): `jdpo.kto_loss` on the rated
  completions (segment 2k+1) with the labels of the batch; kto's reference point z_0 is `jdpo.kto_kl` of
  the slots' mismatched KL completions (segment 2k+2), one estimate per call (per micro-batch in the step,
  as TRL per forward); bco's delta is the running reward mean.

BCO's running moments (`jdpo.running_moments_update`) are updated with the call's rewards before delta is
read (TRL's BCOTrainer), and only with `update=True` (training; evaluation reads them). `step_means` turns
the summed per-slot metrics into the logged means (TRL's KTO names for the unpaired losses).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdpo.losses import pairwise as losses
from jdpo.losses import unpaired as unpaired_losses
from jdpo.losses.logprobs import wpo_weights
from jdpo.losses.spec import LossSpec

Array = jax.Array


def slot_losses(
    loss: LossSpec,
    policy: dict[str, Array],
    ref_chosen: Array | None,
    ref_rejected: Array | None,
    valid: Array,
    *,
    labels: Array | None = None,
    moments: dict[str, Array] | None = None,
    update: bool = True,
    beta: Array | None = None,
) -> tuple[Array, dict[str, Array], dict[str, Array] | None]:
    """(per-slot weighted loss, per-slot metrics, BCO moments after this call) of the loss `loss`.
    `policy`: `jdpo.scoring.forward.pair_logprobs`' chosen / rejected log-probs and
    counts; `valid`: 1 for a filled slot, 0 for an empty one; `labels`: the unpaired batch kind's labels
    (required for the unpaired losses); `moments`: BCO's running moments (required when the loss uses
    them: bco, bco_pair); `beta`: a traced beta (the train state's, `loss.adaptive_beta`) in place of
    `loss.beta`. Sum the per-slot values over slots, micro-batches or a split, then `step_means`.
    """
    valid = jnp.asarray(valid, jnp.float32)
    if loss.running_reward_mean and moments is None:
        raise ValueError(f"loss_type {list(loss.loss_type)} needs BCO's running reward moments")
    if loss.unpaired:
        return _unpaired(loss, policy, ref_chosen, ref_rejected, valid, labels, moments, update, beta)
    weights, extra = valid, {}
    if loss.wpo:
        w = wpo_weights(
            policy["chosen"], policy["rejected"], policy["chosen_counts"], policy["rejected_counts"]
        )
        weights = valid * w
        extra["wpo/weight_mean"] = weights
    kw = loss.loss_kwargs()
    if beta is not None:
        kw["beta"] = beta
    if loss.running_reward_mean:  # bco_pair: both completions' rewards
        rewards = kw["beta"] * jnp.concatenate([(policy["chosen"] - ref_chosen).ravel(),
                                              (policy["rejected"] - ref_rejected).ravel()])  # fmt: skip
        if update:
            moments = unpaired_losses.running_moments_update(moments, rewards, jnp.tile(valid.ravel(), 2))
        kw["bco_delta"] = jax.lax.stop_gradient(moments["mean"])
    out, m = losses.dpo_loss(
        policy["chosen"],
        policy["rejected"],
        ref_chosen,
        ref_rejected,
        chosen_lengths=policy["chosen_counts"],
        rejected_lengths=policy["rejected_counts"],
        weights=weights,
        reduction="none",
        **kw,
    )
    return out, {**m, **extra}, moments


def _unpaired(spec, policy, ref_chosen, ref_rejected, valid, labels, moments, update, beta):
    if labels is None:
        raise ValueError(
            f"loss_type {spec.loss_type[0]} trains on rated examples, but the batch has no labels: load the "
            "data with the unpaired loss set (jdpo.data.unpaired.tokenize_unpaired)"
        )
    kw = spec.unpaired_kwargs()
    if beta is not None:
        kw["beta"] = beta
    pol, ref = policy["chosen"], ref_chosen
    if kw["loss_type"] == "kto":
        kw["kl"] = unpaired_losses.kto_kl(policy["rejected"], ref_rejected, valid)
    if kw["loss_type"] == "bco":
        if update:
            moments = unpaired_losses.running_moments_update(moments, kw["beta"] * (pol - ref), valid)
        kw["delta"] = moments["mean"]
    loss, m = unpaired_losses.kto_loss(pol, ref, labels, weights=valid, reduction="none", **kw)
    return loss, m, moments


def step_means(loss: LossSpec, sums: dict[str, Array]) -> dict[str, Array]:
    """Sums over slots (with the loss in "loss" and the number of filled slots in "pairs") -> the logged
    means: per pair / example, or for the unpaired losses TRL's KTO means (`jdpo.kto_metric_means`:
    rewards and log-probs per class, counts as sums). "pairs" stays a count."""
    n = jnp.maximum(sums["pairs"], 1.0)
    if loss.unpaired:
        out = unpaired_losses.kto_metric_means(sums)
        out["loss"] = sums["loss"] / n
        return out
    return {k: (v if k == "pairs" else v / n) for k, v in sums.items()}
