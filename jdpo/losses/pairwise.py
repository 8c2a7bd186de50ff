"""Pure preference losses over summed completion log-probabilities (``dpo_loss``).

Pairs only: the unpaired losses (one completion labelled desirable or not: kto, apo_zero_unpaired, bco) are
``jdpo.losses.unpaired.kto_loss``, with their table there.

Imports only jax so that it loads fast and can be used without flax or transformers. The log-probs
themselves (from logits or, chunked, from hidden states; per segment of packed rows; WPO weights) are
computed by ``jdpo.losses.logprobs``.

Notation: pc, pr = policy log-probs of chosen / rejected; rc, rr = reference log-probs; b = beta;
cr = pc - rc and rr_ = pr - rr (the per-completion log-ratios); z = (pc - pr) - (rc - rr) (the DPO logit);
eps = label_smoothing; ls(x) = log sigmoid(x); s(x) = sigmoid(x); "/len" = divided by completion lengths when
they are given (otherwise the inputs are taken to be already length-normalised).

================  ====  ===============================================================================
loss_type         ref   per-pair loss
================  ====  ===============================================================================
sigmoid           yes   -(1-eps) ls(b z) - eps ls(-b z)           DPO (Rafailov+ 2023); eps>0 = cDPO
reverse_kl        yes   same as sigmoid (f-DPO with the reverse KL, Wang+ 2023)
forward_kl        yes   -ls(b (exp(-rr_) - exp(-cr)))              f-DPO, f'(u) = -1/u
js_divergence     yes   -ls(b (z - softplus(cr) + softplus(rr_))) f-DPO, f'(u) = log(2u / (1+u))
alpha_divergence  yes   -ls(b (exp(-a rr_) - exp(-a cr)) / a)      f-DPO, f'(u) = (1 - u^-a)/a, a = f_alpha
robust            yes   ((1-eps)(-ls(b z)) - eps(-ls(-b z))) / (1 - 2 eps)   rDPO (Chowdhury+ 2024), eps<0.5
hinge             yes   relu(1 - b z)                              SLiC-HF (Zhao+ 2023)
ipo               yes   (z' - 1/(2b))^2, z' = z with every log-prob /len   IPO (Azar+ 2023), as TRL
sigmoid_norm      yes   sigmoid on z' (every log-prob /len)         length-normalised DPO; alias dpo_norm
exo_pair          yes   s(bz)(ls(bz) - log(1-eps)) + s(-bz)(ls(-bz) - log eps)  EXO eq. 16 (Ji+ 2024);
                        eps = 1e-3 when label_smoothing is 0 (as TRL)
nca_pair          yes   -ls(b cr) - ls(-b cr)/2 - ls(-b rr_)/2     NCA (Chen+ 2024)
bco_pair          yes   -ls(b cr - d) - ls(-(b rr_ - d))          BCO (Jung+ 2024); d = bco_delta. TRL uses a
                        running mean of the rewards for d; here it is an explicit argument (default 0)
                        so the loss stays a pure function: keep the running mean in the train state.
sppo_hard         yes   (cr - 1/(2b))^2 + (rr_ + 1/(2b))^2         SPPO with hard win probabilities (Wu+ 2024)
aot               yes   sigmoid loss on sort(pc - pr) - sort(rc - rr)     AOT paired (Melnyk+ 2024)
aot_unpaired      yes   sigmoid loss on sort(cr) - sort(rr_)              AOT unpaired
apo_zero          yes   1 - s(b cr) + s(b rr_)                      APO-zero eq. 7 (D'Oosterlinck+ 2024)
apo_down          yes   s(b cr) + 1 - s(b (cr - rr_))                APO-down eq. 8
discopop          yes   -ls(bz)(1 - s(bz/t)) + exp(-bz) s(bz/t)    DiscoPOP eq. 5 (Lu+ 2024), t = discopop_tau
sft               no    -pc/len                                     NLL of the chosen completion (per token)
simpo             no    -(1-eps) ls(m) - eps ls(-m), m = b (pc/len - pr/len) - g   SimPO (Meng+ 2024),
                        g = simpo_gamma
orpo              no    -pc/len - b ls(log odds(pc/len) - log odds(pr/len)), log odds(p) = p - log(1 - e^p)
                        ORPO (Hong+ 2024) with lambda = beta as TRL; orpo_include_nll=False drops the NLL
================  ====  ===============================================================================

aot / aot_unpaired sort over all valid pairs of the call (not row-local); the sorted loss at rank k is
attributed to the pair with the k-th smallest (pc - pr) (aot) or cr (aot_unpaired) for weights and
reduction="none".

Numerical safety: all losses are written with log_sigmoid / softplus / a clamped log1mexp, and the
exponentials of forward_kl / alpha_divergence / discopop have their exponent clamped at ``_MAX_EXP`` (so the
loss stays finite; the gradient there is 0). For finite inputs, values and gradients are finite (the squared
losses ipo / sppo_hard up to log-prob magnitudes of ~1e18, where a float32 square overflows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jdpo.losses.defaults import DEFAULTS

Array = jax.Array

# exp(50) ~ 5e21: large enough never to matter for real log-ratios, small enough that sums over many pairs
# and division by a small alpha stay finite in float32.
_MAX_EXP = 50.0
TINY = float(jnp.finfo(jnp.float32).tiny)

# ----------------------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------------------


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); x is clamped to <= -1e-6."""
    x = jnp.minimum(x, -1e-6)
    near_zero = x > -math.log(2.0)
    # Each branch gets an argument valid for it, so the untaken branch is finite and so is its gradient.
    a = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
    b = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
    return jnp.where(near_zero, a, b)


def _capped_exp(x: Array) -> Array:
    return jnp.exp(jnp.minimum(x, _MAX_EXP))


def _smoothed_sigmoid(logits: Array, eps: Any) -> Array:
    """-(1 - eps) log s(x) - eps log s(-x): DPO with label smoothing (conservative DPO)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


class _Ctx:
    """The float32 inputs and hyper-parameters handed to each loss function."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def norm(self, x: Array | None, lengths: Array | None) -> Array | None:
        if x is None or lengths is None:
            return x
        return x / jnp.maximum(lengths, 1.0)


def _z(c: _Ctx, normalise: bool = False) -> Array:
    if normalise:
        pc, pr = c.norm(c.pc, c.lc), c.norm(c.pr, c.lr)
        rc, rr = c.norm(c.rc, c.lc), c.norm(c.rr, c.lr)
    else:
        pc, pr, rc, rr = c.pc, c.pr, c.rc, c.rr
    return (pc - pr) - (rc - rr)


def _sigmoid(c):
    return _smoothed_sigmoid(c.beta * _z(c), c.label_smoothing)


def _sigmoid_norm(c):
    return _smoothed_sigmoid(c.beta * _z(c, normalise=True), c.label_smoothing)


def _robust(c):
    eps = c.label_smoothing
    bz = c.beta * _z(c)
    return ((1.0 - eps) * -jax.nn.log_sigmoid(bz) + eps * jax.nn.log_sigmoid(-bz)) / (1.0 - 2.0 * eps)


def _hinge(c):
    return jax.nn.relu(1.0 - c.beta * _z(c))


def _ipo(c):
    return (_z(c, normalise=True) - 1.0 / (2.0 * c.beta)) ** 2


def _exo_pair(c):
    # jnp (not Python) arithmetic so that a traced label_smoothing works too.
    eps = jnp.where(c.label_smoothing == 0, 1e-3, c.label_smoothing)
    bz = c.beta * _z(c)
    return jax.nn.sigmoid(bz) * (jax.nn.log_sigmoid(bz) - jnp.log1p(-eps)) + jax.nn.sigmoid(-bz) * (
        jax.nn.log_sigmoid(-bz) - jnp.log(eps)
    )


def _nca_pair(c):
    rw, rl = c.beta * (c.pc - c.rc), c.beta * (c.pr - c.rr)
    return -jax.nn.log_sigmoid(rw) - 0.5 * jax.nn.log_sigmoid(-rw) - 0.5 * jax.nn.log_sigmoid(-rl)


def _bco_pair(c):
    rw, rl = c.beta * (c.pc - c.rc), c.beta * (c.pr - c.rr)
    return -jax.nn.log_sigmoid(rw - c.bco_delta) - jax.nn.log_sigmoid(-(rl - c.bco_delta))


def _sppo_hard(c):
    a, b = c.pc - c.rc, c.pr - c.rr
    return (a - 0.5 / c.beta) ** 2 + (b + 0.5 / c.beta) ** 2


def _sorted_pairs(c: _Ctx, first: Array, second: Array) -> tuple[Array, Array, Array]:
    """Sorts ``first`` and ``second`` independently over all valid pairs (invalid ones last).

    Returns both sorted (flat) and the permutation of ``first``, to attribute rank k to a pair.
    """
    valid = c.valid.reshape(-1)
    first, second = first.reshape(-1), second.reshape(-1)
    # Sort keys only (no gradient through argsort); +inf puts empty slots after every valid pair in both.
    perm_first = jnp.argsort(jnp.where(valid, jax.lax.stop_gradient(first), jnp.inf), stable=True)
    perm_second = jnp.argsort(jnp.where(valid, jax.lax.stop_gradient(second), jnp.inf), stable=True)
    return first[perm_first], second[perm_second], perm_first


def _unsort(c: _Ctx, losses_sorted: Array, perm: Array) -> Array:
    # Loss at rank k belongs to pair perm[k]: scatter back to the pair layout.
    return jnp.zeros_like(losses_sorted).at[perm].set(losses_sorted).reshape(c.valid.shape)


def _aot(c):
    first, second, perm = _sorted_pairs(c, c.pc - c.pr, c.rc - c.rr)
    return _unsort(c, _smoothed_sigmoid(c.beta * (first - second), c.label_smoothing), perm)


def _aot_unpaired(c):
    first, second, perm = _sorted_pairs(c, c.pc - c.rc, c.pr - c.rr)
    return _unsort(c, _smoothed_sigmoid(c.beta * (first - second), c.label_smoothing), perm)


def _apo_zero(c):
    return 1.0 - jax.nn.sigmoid(c.beta * (c.pc - c.rc)) + jax.nn.sigmoid(c.beta * (c.pr - c.rr))


def _apo_down(c):
    cr, rr = c.pc - c.rc, c.pr - c.rr
    return jax.nn.sigmoid(c.beta * cr) + 1.0 - jax.nn.sigmoid(c.beta * (cr - rr))


def _discopop(c):
    x = c.beta * _z(c)
    tau = c.discopop_tau
    logistic = -jax.nn.log_sigmoid(x) * jax.nn.sigmoid(-x / tau)
    # exp(-x) * sigmoid(x / tau) in log space: the product is tiny where exp(-x) alone would overflow.
    exponential = _capped_exp(-x + jax.nn.log_sigmoid(x / tau))
    return logistic + exponential


def _fdiv_logits(c, kind: str) -> Array:
    cr, rr = c.pc - c.rc, c.pr - c.rr
    if kind == "forward_kl":
        return _capped_exp(-rr) - _capped_exp(-cr)
    if kind == "js_divergence":
        return _z(c) - jax.nn.softplus(cr) + jax.nn.softplus(rr)
    a = c.f_alpha
    return (_capped_exp(-a * rr) - _capped_exp(-a * cr)) / a


def _forward_kl(c):
    return _smoothed_sigmoid(c.beta * _fdiv_logits(c, "forward_kl"), c.label_smoothing)


def _js_divergence(c):
    return _smoothed_sigmoid(c.beta * _fdiv_logits(c, "js_divergence"), c.label_smoothing)


def _alpha_divergence(c):
    return _smoothed_sigmoid(c.beta * _fdiv_logits(c, "alpha_divergence"), c.label_smoothing)


def _sft(c):
    return -c.norm(c.pc, c.lc)


def _simpo(c):
    margin = c.norm(c.pc, c.lc) - c.norm(c.pr, c.lr)
    return _smoothed_sigmoid(c.beta * margin - c.simpo_gamma, c.label_smoothing)


def _orpo_log_odds(c) -> Array:
    pc, pr = c.norm(c.pc, c.lc), c.norm(c.pr, c.lr)
    return (pc - pr) - (log1mexp(pc) - log1mexp(pr))


def _orpo(c):
    losses = -c.beta * jax.nn.log_sigmoid(_orpo_log_odds(c))
    if c.orpo_include_nll:
        losses = losses - c.norm(c.pc, c.lc)
    return losses


# name -> (loss fn, needs reference, rewards from length-normalised log-probs)
_LOSSES: dict[str, tuple[Callable[[_Ctx], Array], bool, bool]] = {
    "sigmoid": (_sigmoid, True, False),
    "reverse_kl": (_sigmoid, True, False),
    "forward_kl": (_forward_kl, True, False),
    "js_divergence": (_js_divergence, True, False),
    "alpha_divergence": (_alpha_divergence, True, False),
    "robust": (_robust, True, False),
    "hinge": (_hinge, True, False),
    "ipo": (_ipo, True, True),
    "sigmoid_norm": (_sigmoid_norm, True, True),
    "dpo_norm": (_sigmoid_norm, True, True),
    "exo_pair": (_exo_pair, True, False),
    "nca_pair": (_nca_pair, True, False),
    "bco_pair": (_bco_pair, True, False),
    "sppo_hard": (_sppo_hard, True, False),
    "aot": (_aot, True, False),
    "aot_unpaired": (_aot_unpaired, True, False),
    "apo_zero": (_apo_zero, True, False),
    "apo_down": (_apo_down, True, False),
    "discopop": (_discopop, True, False),
    "sft": (_sft, False, True),
    "simpo": (_simpo, False, True),
    "orpo": (_orpo, False, True),
}
LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)
REFERENCE_FREE_LOSS_TYPES: tuple[str, ...] = tuple(k for k, v in _LOSSES.items() if not v[1])
REDUCTIONS = ("mean", "sum", "none")


def is_number(x: Any) -> bool:
    """A Python number (a hyper-parameter to check now), not a traced or array value."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_options(
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: Any = DEFAULTS["beta"],
    label_smoothing: Any = DEFAULTS["label_smoothing"],
    simpo_gamma: Any = DEFAULTS["simpo_gamma"],
    f_alpha: Any = DEFAULTS["f_alpha"],
    discopop_tau: Any = DEFAULTS["discopop_tau"],
    bco_delta: Any = DEFAULTS["bco_delta"],
    orpo_include_nll: bool = DEFAULTS["orpo_include_nll"],
    reduction: str = "mean",
    ref_missing: bool = False,
    prefix: str = "",
) -> None:
    """The one set of rules for `dpo_loss`'s options (the config checks a run's `dpo` section with it,
    `prefix="dpo."` naming the fields as the config does). Raises ValueError naming the option.

    Hyper-parameters may be traced (e.g. a beta schedule): they are checked only when they are numbers.
    """
    del simpo_gamma, bco_delta, orpo_include_nll  # any value is valid
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    unknown = [t for t in types if t not in _LOSSES]
    if unknown:
        raise ValueError(f"{prefix}loss_type: unknown {unknown}; valid options: {', '.join(LOSS_TYPES)}")
    if not types:
        raise ValueError(f"{prefix}loss_type must be non-empty; valid options: {', '.join(LOSS_TYPES)}")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(
            f"{prefix}loss_weights has {len(loss_weights)} entries but {prefix}loss_type has "
            f"{len(types)}: {list(types)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid options: {', '.join(REDUCTIONS)}")
    if ref_missing:
        needing = [t for t in types if _LOSSES[t][1]]
        if needing:
            raise ValueError(
                f"{prefix}loss_type {needing} needs ref_chosen_logps and ref_rejected_logps: these losses "
                f"need a reference (in jdpo train: dpo.reference cached or online); only "
                f"{', '.join(REFERENCE_FREE_LOSS_TYPES)} are reference-free"
            )
    if is_number(beta) and not beta > 0:
        raise ValueError(f"{prefix}beta must be > 0, got {beta}")
    if is_number(label_smoothing):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{prefix}label_smoothing must be in [0, 1], got {label_smoothing}")
        if "robust" in types and label_smoothing >= 0.5:
            raise ValueError(f"loss_type 'robust' needs {prefix}label_smoothing < 0.5, got {label_smoothing}")
        if "exo_pair" in types and label_smoothing >= 1.0:
            raise ValueError(f"loss_type 'exo_pair' needs {prefix}label_smoothing < 1, got {label_smoothing}")
    if "alpha_divergence" in types and is_number(f_alpha) and not f_alpha > 0:
        raise ValueError(f"{prefix}f_alpha must be > 0 for 'alpha_divergence', got {f_alpha}")
    if "discopop" in types and is_number(discopop_tau) and not discopop_tau > 0:
        raise ValueError(f"{prefix}discopop_tau must be > 0, got {discopop_tau}")


def as_float32(x: Any) -> Array | None:
    """`x` as a float32 array (None stays None): every loss computes in float32."""
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = DEFAULTS["beta"],
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = DEFAULTS["label_smoothing"],
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    loss_weights: Sequence[float] | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
    simpo_gamma: float = DEFAULTS["simpo_gamma"],
    f_alpha: float = DEFAULTS["f_alpha"],
    discopop_tau: float = DEFAULTS["discopop_tau"],
    bco_delta: float | Array = DEFAULTS["bco_delta"],
    orpo_include_nll: bool = DEFAULTS["orpo_include_nll"],
) -> tuple[Array, dict[str, Array]]:
    """Preference loss over pairs of any batch shape (e.g. [B] or [B, P]); returns ``(loss, metrics)``.

    Args:
      policy_chosen_logps, policy_rejected_logps: summed completion log-probs of the policy, any float dtype
        (computed in float32).
      ref_chosen_logps, ref_rejected_logps: the same for the reference model; may be None for the
        reference-free losses (``sft``, ``simpo``, ``orpo``).
      beta: the KL / temperature coefficient (tau for IPO, lambda for ORPO as in TRL).
      loss_type: a name from the module docstring table, or a list of names combined as the weighted sum
        ``sum_i loss_weights[i] * loss_i`` (weights default to 1).
      label_smoothing: eps of cDPO / rDPO / EXO / AOT / SimPO / f-DPO.
      chosen_lengths, rejected_lengths: completion token counts, for the length-normalised losses (ipo,
        sigmoid_norm / dpo_norm, simpo, orpo, sft). Without them the log-probs are taken as already
        normalised.
      weights: per-pair weights, 0 for empty slots (validity mask, WPO weights, or both multiplied).
      reduction: "mean" = sum(w l) / sum(w) over pairs; "sum" = sum(w l); "none" = per-pair w l.
      simpo_gamma, f_alpha, discopop_tau, bco_delta, orpo_include_nll: per-loss hyper-parameters (see table).

    Metrics (TRL names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``: plain means over the valid pairs
    (weight > 0), or per-pair arrays (zero at empty slots) with reduction="none". Rewards are
    ``beta * (policy - reference)`` with the log-probs the first loss type uses (length-normalised for ipo /
    sigmoid_norm), and ``beta * policy`` (per-token when lengths are given) for the reference-free ones, as
    TRL's CPO / ORPO trainers report them. Combinations add ``loss/<type>`` per component (reduced like the
    loss); orpo adds ``log_odds_ratio`` and ``log_odds_chosen``.
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    ref_missing = ref_chosen_logps is None or ref_rejected_logps is None
    check_options(
        loss_type=types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        f_alpha=f_alpha,
        discopop_tau=discopop_tau,
        reduction=reduction,
        ref_missing=ref_missing,
    )

    pc, pr = as_float32(policy_chosen_logps), as_float32(policy_rejected_logps)
    shape = jnp.broadcast_shapes(pc.shape, pr.shape)
    w = jnp.ones(shape, jnp.float32) if weights is None else jnp.broadcast_to(as_float32(weights), shape)
    c = _Ctx(
        pc=pc,
        pr=pr,
        rc=as_float32(ref_chosen_logps),
        rr=as_float32(ref_rejected_logps),
        lc=as_float32(chosen_lengths),
        lr=as_float32(rejected_lengths),
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        f_alpha=f_alpha,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
        orpo_include_nll=orpo_include_nll,
        valid=w > 0,
    )

    mixing = (1.0,) * len(types) if loss_weights is None else tuple(loss_weights)
    per_type = {t: jnp.broadcast_to(_LOSSES[t][0](c), shape) for t in types}
    losses = sum(m * per_type[t] for m, t in zip(mixing, types, strict=True))

    valid_f = c.valid.astype(jnp.float32)

    def reduce(x: Array) -> Array:
        if reduction == "none":
            return w * x
        total = jnp.sum(w * x)
        return total if reduction == "sum" else total / jnp.maximum(jnp.sum(w), TINY)

    def describe(x: Array) -> Array:
        x = jax.lax.stop_gradient(x)
        if reduction == "none":
            return valid_f * x
        return jnp.sum(valid_f * x) / jnp.maximum(jnp.sum(valid_f), 1.0)

    _, needs_ref, normalised = _LOSSES[types[0]]
    rw = c.norm(pc, c.lc) if normalised else pc
    rl = c.norm(pr, c.lr) if normalised else pr
    if needs_ref:
        rw = rw - (c.norm(c.rc, c.lc) if normalised else c.rc)
        rl = rl - (c.norm(c.rr, c.lr) if normalised else c.rr)
    chosen_rewards, rejected_rewards = beta * rw, beta * rl
    metrics = {
        "rewards/chosen": describe(chosen_rewards),
        "rewards/rejected": describe(rejected_rewards),
        "rewards/accuracies": describe((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": describe(chosen_rewards - rejected_rewards),
        "logps/chosen": describe(pc),
        "logps/rejected": describe(pr),
    }
    if len(types) > 1:
        for t in types:
            metrics[f"loss/{t}"] = jax.lax.stop_gradient(reduce(per_type[t]))
    if "orpo" in types:
        log_odds = _orpo_log_odds(c)
        metrics["log_odds_ratio"] = describe(jax.nn.log_sigmoid(log_odds))
        metrics["log_odds_chosen"] = describe(log_odds)
    return reduce(losses), metrics
