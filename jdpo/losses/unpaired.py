"""Pure losses for unpaired feedback (``kto_loss``): one completion per example, labelled desirable or not.

Thumbs-up / thumbs-down data has no pairs, so the pairwise ``jdpo.losses.pairwise.dpo_loss`` cannot use it. This
module holds the unpaired losses (KTO, BCO, APO-zero unpaired) and the pure pieces their train step needs
around them: the KL reference point of KTO (``kto_kl``, over the mismatched completions of
``jdpo.kl_mismatch_order``, a rule of the data), BCO's running reward mean (``running_moments_init`` /
``running_moments_update``), and the conversion of summed per-example metrics to TRL's means
(``kto_metric_means``). Like ``jdpo.losses.pairwise`` it imports only jax (and numpy, which jax brings).

Notation: r = policy_logps - ref_logps (the completion's log-ratio); b = beta; s(x) = sigmoid(x);
ls(x) = log sigmoid(x); w_d, w_u = desirable_weight, undesirable_weight (lambda_D, lambda_U in the KTO paper);
kl = KTO's reference point z_0 (``kto_kl``); delta = BCO's reward shift (the running mean of b r).

=================  =======================  =======================  =========================================
loss_type          desirable (label 1)      undesirable (label 0)    source
=================  =======================  =======================  =========================================
kto                w_d (1 - s(b (r - kl)))  w_u (1 - s(b (kl - r)))  KTO (Ethayarajh+ 2024, 2402.01306):
                                                                     lambda_y - v, v = lambda_D s(b (r - z_0))
                                                                     or lambda_U s(b (z_0 - r)); TRL's
                                                                     KTOTrainer loss_type="kto"
apo_zero_unpaired  w_d (1 - s(b r))         w_u s(b r)               APO-zero (D'Oosterlinck+ 2024,
                                                                     2408.06266) unpaired: TRL's KTOTrainer
bco                -w_d ls(b r - delta)     -w_u ls(-(b r - delta))  BCO (Jung+ 2024, 2404.04656) as TRL's
                                                                     BCOTrainer: reward b r, minus delta
=================  =======================  =======================  =========================================

The mean is over examples: ``sum(weights * loss) / sum(weights)`` where ``weights`` is the validity mask (0 =
an empty slot, not an example) as in ``dpo_loss``; w_d and w_u scale each example's loss and do not enter the
denominator (TRL: the class-weighted losses are concatenated, then ``nanmean``). With w_d = w_u = 1, policy ==
reference and kl = 0, every KTO / APO example costs 1 - s(0) = 0.5 (BCO with delta = 0: ln 2).

kl and delta are constants of the step (``stop_gradient`` is applied here too): TRL detaches the KL estimate
and reads delta as a Python float. 1 - s(x) is computed as s(-x), exact where 1 - s(x) would round to 0.

KTO's KL estimate is the paper's z_0 = max(0, mean log-ratio of completions y' paired with the wrong prompt
x), with no gradient through it (``kto_kl``). TRL builds the mismatched pairs per batch of
``per_device_train_batch_size`` examples by rotating the completions by one: prompt i gets completion
(i - 1) mod n (``kl_mismatch_order``), since TRL PR #1970 replaced its earlier reversal, which left the middle
example of an odd batch with its own completion. The KL completions are the batch's own, only re-paired (the
KTO authors' advice, TRL PR #1402).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdpo.losses.defaults import DEFAULTS, UNPAIRED_LOSS_TYPES
from jdpo.losses.pairwise import REDUCTIONS, TINY, as_float32, is_number

Array = jax.Array

# Per-example metrics of kto_loss (reduction="none") and how kto_metric_means turns their sums into means:
# name -> the count it is divided by.
_PER_CLASS = {
    "rewards/chosen": "count/chosen",
    "logps/chosen": "count/chosen",
    "rewards/rejected": "count/rejected",
    "logps/rejected": "count/rejected",
}
_PER_EXAMPLE = ("kl", "delta")  # constants of the call, repeated on every valid example


def _concrete(x: Any) -> bool:
    """True for host values and concrete arrays: those whose values can be checked without tracing."""
    return x is not None and not isinstance(x, jax.core.Tracer)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_unpaired_options(
    *,
    loss_type: str = "kto",
    beta: Any = DEFAULTS["beta"],
    desirable_weight: Any = DEFAULTS["desirable_weight"],
    undesirable_weight: Any = DEFAULTS["undesirable_weight"],
    reduction: str = "mean",
    kl: Any = None,
    delta: Any = None,
    policy_logps: Any = None,
    ref_logps: Any = None,
    labels: Any = None,
    weights: Any = None,
    prefix: str = "",
    needs_inputs: bool = False,
) -> None:
    """The one set of rules for `kto_loss`'s options and inputs; raises ValueError naming the option.

    The config checks a run's `dpo` section with it (``prefix="dpo."`` names the fields as the config does;
    without ``needs_inputs`` the per-call inputs kl / delta are not required). Hyper-parameters may be traced
    (checked only when they are numbers); array values (labels in {0, 1}, weights >= 0) only when they are
    concrete, never under jit; shapes always.
    """
    if loss_type not in UNPAIRED_LOSS_TYPES:
        raise ValueError(
            f"{prefix}loss_type: unknown {loss_type!r}; valid options: {', '.join(UNPAIRED_LOSS_TYPES)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid options: {', '.join(REDUCTIONS)}")
    if is_number(beta) and not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"{prefix}beta must be > 0 and finite, got {beta}")
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if is_number(value) and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{prefix}{name} must be >= 0 and finite, got {value}")
    if (
        is_number(desirable_weight)
        and is_number(undesirable_weight)
        and desirable_weight == undesirable_weight == 0
    ):
        raise ValueError(
            f"{prefix}desirable_weight and {prefix}undesirable_weight are both 0: nothing to learn"
        )

    if needs_inputs:
        if loss_type == "kto" and kl is None:
            raise ValueError(
                "loss_type 'kto' needs kl: the reference point z_0, jdpo.kto_kl of the policy and reference "
                "log-probs of the mismatched completions (jdpo.kl_mismatch_order)"
            )
        if loss_type != "kto" and kl is not None:
            raise ValueError(f"kl is given but loss_type {loss_type!r} does not use it (only 'kto' does)")
        if loss_type == "bco" and delta is None:
            raise ValueError(
                "loss_type 'bco' needs delta: the running mean of the rewards beta * (policy - reference), "
                "kept in the train state (jdpo.running_moments_update; delta = moments['mean'])"
            )
        if loss_type != "bco" and delta is not None:
            raise ValueError(f"delta is given but loss_type {loss_type!r} does not use it (only 'bco' does)")
    for name, value in (("kl", kl), ("delta", delta)):
        if is_number(value) and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")

    if policy_logps is None:
        return
    shape = _shape(policy_logps)
    for name, value in (("ref_logps", ref_logps), ("labels", labels)):
        if value is not None and _shape(value) != shape:
            raise ValueError(
                f"{name} has shape {_shape(value)} but policy_logps has shape {shape}: one per example"
            )
    if labels is not None and _concrete(labels):
        lab = np.asarray(labels)
        if lab.dtype != np.bool_:
            if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.floating)):
                raise ValueError(f"labels must be boolean or 0 / 1, got dtype {lab.dtype}")
            bad = np.unique(lab[(lab != 0) & (lab != 1)])
            if bad.size:
                raise ValueError(
                    f"labels must be boolean or 0 / 1 (1 = desirable), got values {bad[:5].tolist()}"
                )
    if weights is not None:
        try:
            np.broadcast_shapes(_shape(weights), shape)
        except ValueError:
            raise ValueError(
                f"weights has shape {_shape(weights)}, not broadcastable to policy_logps' {shape}"
            ) from None
        if _concrete(weights):
            w = np.asarray(weights, np.float64)
            if not np.all(w >= 0):  # also catches NaN
                raise ValueError(
                    f"weights must be >= 0 (0 marks an empty slot), got {w[~(w >= 0)][:5].tolist()}"
                )


def kto_loss(
    policy_logps: Array,
    ref_logps: Array,
    labels: Array,
    *,
    kl: Array | float | None = None,
    delta: Array | float | None = None,
    loss_type: str = "kto",
    beta: float = DEFAULTS["beta"],
    desirable_weight: float = DEFAULTS["desirable_weight"],
    undesirable_weight: float = DEFAULTS["undesirable_weight"],
    weights: Array | None = None,
    reduction: str = "mean",
) -> tuple[Array, dict[str, Array]]:
    """Unpaired preference loss over examples of any batch shape (e.g. [B] or [B, P]); ``(loss, metrics)``.

    Args:
      policy_logps, ref_logps: summed completion log-probs of the policy / reference, one per example, any
        float dtype (computed in float32).
      labels: the same shape, bool or 0 / 1: True / 1 = desirable (thumbs up), False / 0 = undesirable.
      kl: KTO's reference point z_0, a scalar (or broadcastable) from ``kto_kl``; only for loss_type="kto".
        Under stop_gradient.
      delta: BCO's reward shift; only for loss_type="bco": the running mean of the rewards b r, TRL's
        ``RunningMoments`` mean after updating it with this batch (``running_moments_update``; the state
        lives in the train state). Under stop_gradient.
      loss_type: "kto", "apo_zero_unpaired" or "bco" (module docstring table).
      beta: b, the inverse temperature of the implicit reward b r.
      desirable_weight, undesirable_weight: w_d / w_u, scale the losses of each class (TRL's KTOConfig;
        TRL's BCOTrainer has no such weights: the defaults 1 are TRL's BCO).
      weights: per-example weights, 0 for empty slots (validity mask, or any non-negative weighting).
      reduction: "mean" = sum(w l) / sum(w) over examples; "sum" = sum(w l); "none" = per-example w l.

    Metrics (TRL's KTO / BCO names): ``rewards/chosen`` / ``rewards/rejected`` (mean b r over the valid
    desirable / undesirable examples), ``logps/chosen`` / ``logps/rejected`` (mean policy log-prob over the
    same), ``count/chosen`` / ``count/rejected`` (number of valid examples of each class), ``rewards/margins``
    (chosen - rejected, as TRL's log), ``kl`` (kto) or ``delta`` (bco). A class without examples has mean 0
    and count 0 (TRL omits the key). With reduction="none" the metrics are per-example arrays whose SUMS over
    any set of calls (micro-batches, devices) ``kto_metric_means`` turns into these means: b r and the
    log-prob at the valid examples of their class (0 elsewhere), a 0 / 1 class indicator for the counts, and
    kl / delta at every valid example; there is no per-example ``rewards/margins``.
    """
    check_unpaired_options(
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        reduction=reduction,
        kl=kl,
        delta=delta,
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        labels=labels,
        weights=weights,
        needs_inputs=True,
    )
    pol, ref = as_float32(policy_logps), as_float32(ref_logps)
    shape = pol.shape
    w = jnp.ones(shape, jnp.float32) if weights is None else jnp.broadcast_to(as_float32(weights), shape)
    valid = w > 0
    lab = jnp.asarray(labels)
    desirable = lab if lab.dtype == jnp.bool_ else lab != 0
    # Empty slots may hold anything (even inf): they get r = 0, so neither loss nor gradient sees them.
    r = jnp.where(valid, pol - ref, 0.0)
    br = beta * r

    z0 = d = None
    if loss_type == "kto":
        z0 = jnp.broadcast_to(jax.lax.stop_gradient(as_float32(kl)), shape)
        # 1 - s(x) = s(-x): desirable s(-b (r - kl)), undesirable s(-b (kl - r)).
        per_class = jnp.where(desirable, jax.nn.sigmoid(beta * (z0 - r)), jax.nn.sigmoid(beta * (r - z0)))
    elif loss_type == "apo_zero_unpaired":
        per_class = jnp.where(desirable, jax.nn.sigmoid(-br), jax.nn.sigmoid(br))
    else:  # bco
        d = jnp.broadcast_to(jax.lax.stop_gradient(as_float32(delta)), shape)
        per_class = jnp.where(desirable, -jax.nn.log_sigmoid(br - d), -jax.nn.log_sigmoid(-(br - d)))
    losses = jnp.where(desirable, desirable_weight, undesirable_weight) * per_class

    if reduction == "none":
        loss = w * losses
    else:
        total = jnp.sum(w * losses)
        loss = total if reduction == "sum" else total / jnp.maximum(jnp.sum(w), TINY)

    extra = {"kl": z0} if loss_type == "kto" else {"delta": d} if loss_type == "bco" else {}
    per_example = _per_example_metrics(valid, desirable, br, pol, extra)
    if reduction == "none":
        return loss, per_example
    return loss, kto_metric_means({k: jnp.sum(v) for k, v in per_example.items()})


def _per_example_metrics(valid, desirable, br, pol, extra: dict) -> dict:
    """The per-example metric terms (0 outside their class or slot) whose sums `kto_metric_means` turns
    into TRL's KTO / BCO means; `extra`: kl or delta, reported at every valid example."""
    chosen = (valid & desirable).astype(jnp.float32)
    rejected = (valid & ~desirable).astype(jnp.float32)
    pol_valid = jnp.where(valid, pol, 0.0)
    out = {
        "rewards/chosen": chosen * br,
        "rewards/rejected": rejected * br,
        "logps/chosen": chosen * pol_valid,
        "logps/rejected": rejected * pol_valid,
        "count/chosen": chosen,
        "count/rejected": rejected,
        **{k: valid.astype(jnp.float32) * v for k, v in extra.items()},
    }
    return {k: jax.lax.stop_gradient(v) for k, v in out.items()}


def kto_metric_means(sums: Mapping[str, Array]) -> dict[str, Array]:
    """Sums of `kto_loss`'s per-example metrics (reduction="none", summed over examples, micro-batches or
    devices) -> TRL's logged means: rewards / logps of each class divided by that class's count (TRL logs
    ``rewards/chosen_sum`` / ``count/chosen``), ``kl`` / ``delta`` by the number of valid examples, plus
    ``rewards/margins`` = rewards/chosen - rewards/rejected. Counts stay sums; other keys (e.g. the step's
    "loss") pass through unchanged.
    """
    out = dict(sums)
    n_valid = jnp.maximum(sums["count/chosen"] + sums["count/rejected"], 1.0)
    for key, count in _PER_CLASS.items():
        out[key] = sums[key] / jnp.maximum(sums[count], 1.0)
    for key in _PER_EXAMPLE:
        if key in sums:
            out[key] = sums[key] / n_valid
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_kl(policy_kl_logps: Array, ref_kl_logps: Array, weights: Array | None = None) -> Array:
    """KTO's reference point z_0 = max(mean(policy - reference), 0) over the valid examples, a float32 scalar
    under stop_gradient (KTO paper: the KL estimate from mismatched pairs, clamped at 0, not backpropagated).

    ``policy_kl_logps`` / ``ref_kl_logps``: summed log-probs of the completions paired with the wrong prompt
    (``kl_mismatch_order``), any shape (one step's micro-batches at once if wanted); ``weights`` > 0 marks
    the valid examples (empty slots may hold anything). No valid example: 0. TRL averages per process and then
    over processes (equal when the processes hold equal counts); here it is one mean over all valid examples,
    which under jit over a sharded batch is the global one.
    """
    p, r = as_float32(policy_kl_logps), as_float32(ref_kl_logps)
    shape = jnp.broadcast_shapes(p.shape, r.shape)
    valid = jnp.ones(shape, bool) if weights is None else jnp.broadcast_to(as_float32(weights), shape) > 0
    n = jnp.sum(valid.astype(jnp.float32))
    mean = jnp.sum(jnp.where(valid, p - r, 0.0)) / jnp.maximum(n, 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


# ----------------------------------------------------------------------------------------------------------
# BCO's running reward mean
# ----------------------------------------------------------------------------------------------------------


def running_moments_init() -> dict[str, Array]:
    """The running moments of BCO's rewards before any batch: ``{"mean": 0, "var": 1, "count": 0}``
    (float32, float32, int32 scalars): a plain pytree to keep in (and checkpoint with) the train state.

    TRL's ``RunningMoments`` starts at mean 0, var 1 (std 1) and count 1e-24, the tiny count only guarding
    its divisions: after its first update the mean is the batch mean exactly and the variance the batch
    variance plus 1e-24 / n, as here up to that 1e-24. The count is an int here (exact past 2**24 examples).
    """
    return {
        "mean": jnp.zeros((), jnp.float32),
        "var": jnp.ones((), jnp.float32),
        "count": jnp.zeros((), jnp.int32),
    }


def running_moments_update(
    moments: Mapping[str, Array], values: Array, weights: Array | None = None
) -> dict[str, Array]:
    """``moments`` updated with a batch of ``values`` (the rewards beta * (policy - reference)), as TRL's
    ``RunningMoments.update``: the batch's mean m and population variance v over its n valid values (weights
    > 0) are merged into the running ones (Chan et al.'s parallel combination, exact for any split of the
    stream into batches up to float rounding)::

        tot = count + n;  d = m - mean
        mean' = mean + d * n / tot
        var'  = (var * count + d**2 * count * n / tot + v * n) / tot
        count' = tot

    A pure function (state, batch) -> state under stop_gradient; a batch without valid values changes nothing
    (TRL would divide by zero). BCO's delta is ``running_moments_update(...)["mean"]`` of the moments updated
    with the current batch first (TRL's BCOTrainer updates, then reads the mean; evaluation reads without
    updating). TRL updates once per forward call, i.e. per micro-batch under gradient accumulation; the
    merged moments do not depend on that split, the delta each micro-batch sees does.
    """
    x = jax.lax.stop_gradient(as_float32(values))
    valid = jnp.ones(x.shape, bool) if weights is None else jnp.broadcast_to(as_float32(weights), x.shape) > 0
    n = jnp.sum(valid.astype(jnp.float32))
    safe_n = jnp.maximum(n, 1.0)
    m = jnp.sum(jnp.where(valid, x, 0.0)) / safe_n
    v = jnp.sum(jnp.where(valid, (x - m) ** 2, 0.0)) / safe_n

    mean, var = as_float32(moments["mean"]), as_float32(moments["var"])
    count = as_float32(moments["count"])
    tot = jnp.maximum(count + n, 1.0)
    d = m - mean
    new_mean = mean + d * n / tot
    new_var = (var * count + d * d * count * n / tot + v * n) / tot
    has = n > 0
    return {
        "mean": jnp.where(has, new_mean, mean),
        "var": jnp.where(has, new_var, var),
        "count": jnp.asarray(moments["count"]) + n.astype(jnp.int32),
    }
