"""Pure preference losses and the log-probabilities they are built from.

Imports only jax / numpy / einops so that it loads fast and can be used without flax or transformers.

Log-probabilities
-----------------
``targets_BxT[t]`` is the token predicted by the model output at position t (already shifted), and
``mask_BxT[t]`` is 1 where that target is a completion token to be scored. Everything is computed in float32.

- ``token_logprobs`` / ``sequence_logprobs``: from full logits [B, T, V].
- ``token_logprobs_from_hidden`` / ``sequence_logprobs_from_hidden``: from the final hidden states and the
  unembedding, in chunks of positions, so no [B, T, V] float32 tensor exists, not even in the backward pass.
- ``segment_logprobs``: per-segment sums for packed rows (segment 0 is padding).
- ``wpo_token_logprobs`` (+ ``_from_hidden``) and ``wpo_weights``: the WPO per-pair weights.

Preference losses (``dpo_loss``)
--------------------------------
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

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange

Array = jax.Array

# exp(50) ~ 5e21: large enough never to matter for real log-ratios, small enough that sums over many pairs
# and division by a small alpha stay finite in float32.
_MAX_EXP = 50.0
_TINY = float(jnp.finfo(jnp.float32).tiny)

# ----------------------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------------------


def _safe_targets(targets_BxT: Array, vocab_size: int) -> Array:
    # Ignore indices (e.g. -100) or pad ids outside the vocabulary would gather NaN in "fill" mode; they are
    # masked out by the caller, so clamping them to a valid id is enough.
    return jnp.clip(targets_BxT.astype(jnp.int32), 0, vocab_size - 1)


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """Log-softmax of ``logits_BxTxV`` gathered at ``targets_BxT``; float32 [B, T].

    Materialises the float32 logits; use ``token_logprobs_from_hidden`` for large vocabularies.
    """
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    targets_BxT = _safe_targets(targets_BxT, logits_BxTxV.shape[-1])
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return target_BxT - lse_BxT


def _masked_sums(logp_BxT: Array, mask_BxT: Array, average: bool) -> tuple[Array, Array]:
    mask_BxT = mask_BxT.astype(jnp.float32)
    # where (not multiply) so that a non-finite log-prob at a masked position cannot leak in.
    logps_B = jnp.sum(jnp.where(mask_BxT > 0, logp_BxT * mask_BxT, 0.0), axis=-1)
    counts_B = jnp.sum(mask_BxT, axis=-1)
    if average:
        logps_B = _safe_div(logps_B, counts_B)
    return logps_B, counts_B


def _safe_div(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0; gradients are finite (no 0/0 in the untaken branch)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def sequence_logprobs(
    logits_BxTxV: Array, targets_BxT: Array, mask_BxT: Array, *, average: bool = False
) -> tuple[Array, Array]:
    """Sum (or mean, ``average=True``) of target log-probs over masked tokens.

    Returns ``(logps_B, counts_B)``, both float32; the mean of a row with no masked token is 0.
    """
    return _masked_sums(token_logprobs(logits_BxTxV, targets_BxT), mask_BxT, average)


def _chunk_stats(
    hidden_BxCxD: Array, unembed_DxV: Array, targets_BxC: Array, cap: float | None, wpo: bool
) -> Array:
    """Target log-probs of one chunk (or, with ``wpo``, log p - log sum_v p_v^2) in float32 [B, C]."""
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, unembed_DxV, preferred_element_type=jnp.float32)
    if cap is not None:
        logits_BxCxV = cap * jnp.tanh(logits_BxCxV / cap)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    logp_BxC = target_BxC - lse_BxC
    if wpo:
        # log sum_v p_v^2 = logsumexp(2 logits) - 2 lse
        logp_BxC = logp_BxC - (jax.nn.logsumexp(2.0 * logits_BxCxV, axis=-1) - 2.0 * lse_BxC)
    return logp_BxC


def _chunked(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    chunk_size: int,
    logit_soft_cap: float | None,
    wpo: bool,
    mask_BxT: Array | None = None,
    row_groups: int = 1,
) -> tuple[Array, Array]:
    """(log-probs float32 [B, T], number of chunks projected: a traced int32, for tests)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B0, T0, D = hidden_BxTxD.shape
    if row_groups < 1 or B0 % row_groups:
        raise ValueError(f"row_groups={row_groups} must be >= 1 and divide the batch of {B0} rows")
    # Rows are laid end to end in `row_groups` groups: the scored positions of a whole group are gathered
    # to its front, so the chunks run ~ (scored positions of the group) / chunk_size times, not
    # (scored positions of the fullest row) x rows / chunk_size. Groups are whole rows in batch order, so
    # with one group per batch shard the regrouping and the sort stay on each device.
    hidden_BxTxD = hidden_BxTxD.reshape(row_groups, -1, D)
    targets_BxT = targets_BxT.reshape(row_groups, -1)
    if mask_BxT is not None:
        mask_BxT = mask_BxT.reshape(row_groups, -1)
    B, T, _ = hidden_BxTxD.shape
    targets_BxT = _safe_targets(targets_BxT, unembed_DxV.shape[-1])
    if mask_BxT is not None:
        # Completion-only: a stable sort of each row puts its scored positions first (in order), so the
        # chunks past the longest row's count of scored positions are empty and are skipped below. Only the
        # order of the positions changes (the per-position numbers do not); they are put back at the end.
        keep_BxT = mask_BxT > 0
        perm_BxT = jnp.argsort(~keep_BxT, axis=-1, stable=True)
        hidden_BxTxD = jnp.take_along_axis(hidden_BxTxD, perm_BxT[..., None], axis=1)
        targets_BxT = jnp.take_along_axis(targets_BxT, perm_BxT, axis=1)
        keep_BxT = jnp.take_along_axis(keep_BxT, perm_BxT, axis=1)
    else:
        keep_BxT = jnp.ones((B, T), jnp.bool_)
    C = min(chunk_size, T)
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    # Chunks run along positions with the batch axis kept whole, so a batch sharded over devices stays sharded
    # and every device computes only its own rows' [B_local, C, V] logits per step.
    hidden_NxBxCxD = rearrange(jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))), "b (n c) d -> n b c d", c=C)
    targets_NxBxC = rearrange(jnp.pad(targets_BxT, ((0, 0), (0, pad))), "b (n c) -> n b c", c=C)
    keep_NxBxC = rearrange(jnp.pad(keep_BxT, ((0, 0), (0, pad))), "b (n c) -> n b c", c=C)

    stats = jax.checkpoint(functools.partial(_chunk_stats, cap=logit_soft_cap, wpo=wpo), prevent_cse=False)

    def chunk(h_BxCxD, w_DxV, t_BxC, k_BxC):
        # A chunk with no scored position (of any row) is not projected, forward or backward (without a mask
        # every chunk is scored); unscored positions inside a scored chunk are computed, then zeroed.
        logp_BxC = jax.lax.cond(
            jnp.any(k_BxC), stats, lambda h, w, t: jnp.zeros(t.shape, jnp.float32), h_BxCxD, w_DxV, t_BxC
        )
        return jnp.where(k_BxC, logp_BxC, 0.0)

    # checkpoint: the backward pass recomputes each chunk's logits instead of saving [B, C, V] per chunk,
    # which would add up to the [B, T, V] tensor we are avoiding. The cond sits inside it so that its only
    # residuals are the chunk's inputs (the unembedding stays a loop invariant, not a per-chunk copy).
    chunk_fn = jax.checkpoint(chunk, prevent_cse=False)

    def body(n_run, xs):
        h_BxCxD, t_BxC, k_BxC = xs
        return n_run + jnp.any(k_BxC).astype(jnp.int32), chunk_fn(h_BxCxD, unembed_DxV, t_BxC, k_BxC)

    n_run, logp_NxBxC = jax.lax.scan(body, jnp.int32(0), (hidden_NxBxCxD, targets_NxBxC, keep_NxBxC))
    logp_BxT = rearrange(logp_NxBxC, "n b c -> b (n c)")[:, :T]
    if mask_BxT is not None:
        logp_BxT = jnp.take_along_axis(logp_BxT, jnp.argsort(perm_BxT, axis=-1), axis=1)
    return logp_BxT.reshape(B0, T0), n_run


def token_logprobs_from_hidden(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    *,
    mask_BxT: Array | None = None,
    chunk_size: int = 128,
    logit_soft_cap: float | None = None,
    row_groups: int = 1,
) -> Array:
    """Target log-probs from final hidden states and the unembedding, float32 [B, T].

    Same numbers as ``token_logprobs(hidden @ unembed, targets)`` (with ``cap * tanh(logits / cap)`` applied
    when ``logit_soft_cap`` is set, as Gemma-2 does), but the logits are built ``chunk_size`` positions at a
    time inside a ``lax.scan`` under ``jax.checkpoint``: peak extra memory is one float32 [B, chunk_size, V]
    block, forward and backward. T is padded up to a multiple of the chunk. The matmul accumulates in float32
    whatever the dtype of ``hidden_BxTxD`` / ``unembed_DxV`` (e.g. bfloat16).

    With ``mask_BxT``, only positions where it is > 0 are scored (the others are 0): the rows are laid end to
    end in ``row_groups`` groups, each group's scored positions are gathered to its front (a stable sort,
    same shapes) and the chunks holding none of any group are skipped, so the unembedding costs ~ the
    scored positions (rounded up to chunks) instead of B x T. ``row_groups`` must divide B; when the rows
    are sharded over devices, pass the number of batch shards so each group lives on one device (the
    default, 1, sorts across all rows).
    """
    return _chunked(
        hidden_BxTxD,
        unembed_DxV,
        targets_BxT,
        chunk_size,
        logit_soft_cap,
        wpo=False,
        mask_BxT=mask_BxT,
        row_groups=row_groups,
    )[0]


def sequence_logprobs_from_hidden(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    mask_BxT: Array,
    *,
    average: bool = False,
    chunk_size: int = 128,
    logit_soft_cap: float | None = None,
) -> tuple[Array, Array]:
    """``sequence_logprobs`` via ``token_logprobs_from_hidden``; returns ``(logps_B, counts_B)`` float32."""
    logp_BxT = token_logprobs_from_hidden(
        hidden_BxTxD,
        unembed_DxV,
        targets_BxT,
        mask_BxT=mask_BxT,
        chunk_size=chunk_size,
        logit_soft_cap=logit_soft_cap,
    )
    return _masked_sums(logp_BxT, mask_BxT, average)


def segment_logprobs(
    logp_BxT: Array, mask_BxT: Array, segment_ids_BxT: Array, num_segments: int, *, average: bool = False
) -> tuple[Array, Array]:
    """Per-row sums (or means) of masked token log-probs for segments 1..S of packed rows.

    Segment 0 is padding and is ignored. Returns ``(logps_BxS, counts_BxS)`` float32 where column s holds
    segment s + 1. Row-local (a one-hot contraction over positions), so it shards with the batch rows.
    """
    mask_BxT = mask_BxT.astype(jnp.float32)
    onehot_BxTxS = (
        segment_ids_BxT[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids_BxT.dtype)
    ).astype(jnp.float32)
    weighted_BxT = jnp.where(mask_BxT > 0, logp_BxT.astype(jnp.float32) * mask_BxT, 0.0)
    logps_BxS = jnp.einsum("bt,bts->bs", weighted_BxT, onehot_BxTxS)
    counts_BxS = jnp.einsum("bt,bts->bs", mask_BxT, onehot_BxTxS)
    if average:
        logps_BxS = _safe_div(logps_BxS, counts_BxS)
    return logps_BxS, counts_BxS


# ----------------------------------------------------------------------------------------------------------
# WPO (Zhou+ 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2 as TRL implements it)
# ----------------------------------------------------------------------------------------------------------


def wpo_token_logprobs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """Per-token ``log p(target) - log sum_v p_v^2`` (float32 [B, T], no gradient), the WPO token weight.

    Sum it over completion tokens (``segment_logprobs`` / masked sums) and pass to ``wpo_weights``.
    """
    logits_BxTxV = jax.lax.stop_gradient(logits_BxTxV).astype(jnp.float32)
    targets_BxT = _safe_targets(targets_BxT, logits_BxTxV.shape[-1])
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    log_sum_p2_BxT = jax.nn.logsumexp(2.0 * logits_BxTxV, axis=-1) - 2.0 * lse_BxT
    return target_BxT - lse_BxT - log_sum_p2_BxT


def wpo_token_logprobs_from_hidden(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    *,
    mask_BxT: Array | None = None,
    chunk_size: int = 128,
    logit_soft_cap: float | None = None,
    row_groups: int = 1,
) -> Array:
    """Chunked ``wpo_token_logprobs`` from hidden states (see ``token_logprobs_from_hidden``, ``mask_BxT``
    included); no gradient."""
    hidden_BxTxD, unembed_DxV = jax.lax.stop_gradient((hidden_BxTxD, unembed_DxV))
    return _chunked(
        hidden_BxTxD,
        unembed_DxV,
        targets_BxT,
        chunk_size,
        logit_soft_cap,
        wpo=True,
        mask_BxT=mask_BxT,
        row_groups=row_groups,
    )[0]


def wpo_weights(
    chosen_adj_logps: Array, rejected_adj_logps: Array, chosen_lengths: Array, rejected_lengths: Array
) -> Array:
    """WPO per-pair weights ``min(1, exp(mean_t adj_c + mean_t adj_r))`` for ``dpo_loss(weights=...)``.

    ``*_adj_logps`` are sums over completion tokens of ``wpo_token_logprobs``; the means divide by the lengths
    (a zero length gives a mean of 0). The result carries no gradient, as in the paper. Multiply by the
    validity mask of the pair slots yourself (an empty slot must get weight 0).
    """
    mean_c = _safe_div(jnp.asarray(chosen_adj_logps, jnp.float32), jnp.asarray(chosen_lengths, jnp.float32))
    mean_r = _safe_div(
        jnp.asarray(rejected_adj_logps, jnp.float32), jnp.asarray(rejected_lengths, jnp.float32)
    )
    # exp(min(x, 0)) == min(exp(x), 1) without overflow.
    return jax.lax.stop_gradient(jnp.exp(jnp.minimum(mean_c + mean_r, 0.0)))


# ----------------------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------------------


def _log1mexp(x: Array) -> Array:
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
    return (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))


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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(types, loss_weights, beta, label_smoothing, reduction, ref_missing, f_alpha, discopop_tau):
    for t in types:
        if t not in _LOSSES:
            raise ValueError(f"unknown loss_type {t!r}; valid options: {', '.join(LOSS_TYPES)}")
    if not types:
        raise ValueError(f"loss_type must be non-empty; valid options: {', '.join(LOSS_TYPES)}")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_type has {len(types)}: {types}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid options: {', '.join(REDUCTIONS)}")
    if ref_missing:
        needing = [t for t in types if _LOSSES[t][1]]
        if needing:
            raise ValueError(
                f"loss_type {needing} needs ref_chosen_logps and ref_rejected_logps; only "
                f"{', '.join(REFERENCE_FREE_LOSS_TYPES)} are reference-free"
            )
    # Hyper-parameters may be traced (e.g. a beta schedule); check them only when they are Python numbers.
    if _is_number(beta) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if _is_number(label_smoothing):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if "robust" in types and label_smoothing >= 0.5:
            raise ValueError(f"loss_type 'robust' needs label_smoothing < 0.5, got {label_smoothing}")
        if "exo_pair" in types and label_smoothing >= 1.0:
            raise ValueError(f"loss_type 'exo_pair' needs label_smoothing < 1, got {label_smoothing}")
    if "alpha_divergence" in types and _is_number(f_alpha) and f_alpha <= 0:
        raise ValueError(f"f_alpha must be > 0 for 'alpha_divergence', got {f_alpha}")
    if "discopop" in types and _is_number(discopop_tau) and discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")


def _f32(x: Any) -> Array | None:
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    loss_weights: Sequence[float] | None = None,
    weights: Array | None = None,
    reduction: str = "mean",
    simpo_gamma: float = 0.5,
    f_alpha: float = 1.0,
    discopop_tau: float = 0.05,
    bco_delta: float | Array = 0.0,
    orpo_include_nll: bool = True,
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
    _validate(types, loss_weights, beta, label_smoothing, reduction, ref_missing, f_alpha, discopop_tau)

    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    shape = jnp.broadcast_shapes(pc.shape, pr.shape)
    w = jnp.ones(shape, jnp.float32) if weights is None else jnp.broadcast_to(_f32(weights), shape)
    c = _Ctx(
        pc=pc,
        pr=pr,
        rc=_f32(ref_chosen_logps),
        rr=_f32(ref_rejected_logps),
        lc=_f32(chosen_lengths),
        lr=_f32(rejected_lengths),
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
        return total if reduction == "sum" else total / jnp.maximum(jnp.sum(w), _TINY)

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
