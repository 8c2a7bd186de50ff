"""Per-token and per-sequence log-probabilities of completions, the inputs of every preference loss.

Imports only jax and einops so that it loads fast and can be used without flax or transformers.

``targets_BxT[t]`` is the token predicted by the model output at position t (already shifted), and
``mask_BxT[t]`` is 1 where that target is a completion token to be scored. Everything is computed in float32.

- ``token_logprobs`` / ``sequence_logprobs``: from full logits [B, T, V].
- ``token_logprobs_from_hidden`` / ``sequence_logprobs_from_hidden``: from the final hidden states and the
  unembedding, in chunks of positions, so no [B, T, V] float32 tensor exists, not even in the backward pass.
- ``segment_logprobs``: per-segment sums for packed rows (segment 0 is padding).
- ``wpo_token_logprobs`` (+ ``_from_hidden``) and ``wpo_weights``: the WPO per-pair weights, built from the
  same chunked pass and handed to ``jdpo.losses.dpo_loss(weights=...)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

Array = jax.Array


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
    # Chunks run along positions with the group axis kept whole: with one group per batch shard, a batch
    # sharded over devices stays sharded and every device computes only its own group's [C, V] logits.
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
    time inside a ``lax.scan`` under ``jax.checkpoint``: peak extra memory is one float32
    [row_groups, chunk_size, V] block, forward and backward. Each group's length is padded up to a multiple
    of the chunk. The matmul accumulates in float32 whatever the dtype of ``hidden_BxTxD`` / ``unembed_DxV``
    (e.g. bfloat16).

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

    ``*_adj_logps`` are sums over completion tokens of ``wpo_token_logprobs`` (TRL's variant), or of the
    plain token log-probs (open-instruct's ``wpo``, what ``dpo.wpo: true`` computes in the train step from
    the policy's summed log-probs); the means divide by the lengths (a zero length gives a mean of 0).
    The result carries no gradient, as in the paper. Multiply by the validity mask of the pair slots
    yourself (an empty slot must get weight 0).
    """
    mean_c = _safe_div(jnp.asarray(chosen_adj_logps, jnp.float32), jnp.asarray(chosen_lengths, jnp.float32))
    mean_r = _safe_div(
        jnp.asarray(rejected_adj_logps, jnp.float32), jnp.asarray(rejected_lengths, jnp.float32)
    )
    # exp(min(x, 0)) == min(exp(x), 1) without overflow.
    return jax.lax.stop_gradient(jnp.exp(jnp.minimum(mean_c + mean_r, 0.0)))
