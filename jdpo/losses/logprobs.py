"""Per-token and per-sequence log-probabilities of completions, the inputs of every preference loss.

Imports only jax and numpy so that it loads fast and can be used without flax or transformers.

``targets_BxT[t]`` is the token predicted by the model output at position t (already shifted), and
``mask_BxT[t]`` is 1 where that target is a completion token to be scored. Everything is computed in float32.

- ``token_logprobs`` / ``sequence_logprobs``: from full logits [B, T, V].
- ``token_logprobs_from_hidden`` / ``sequence_logprobs_from_hidden``: from the final hidden states and the
  unembedding, in chunks of positions, so no [B, T, V] float32 tensor exists, not even in the backward pass.
- ``segment_logprobs``: per-segment sums for packed rows (segment 0 is padding).
- ``wpo_token_logprobs`` and ``wpo_weights``: the WPO per-pair weights, built from the
  same chunked pass and handed to ``jdpo.losses.pairwise.dpo_loss(weights=...)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def _w_spec(vocab_first: bool) -> str:
    """The einsum operand of the unembedding: [D, V], or [V, D] (a tied embedding matrix as stored)."""
    return "vd" if vocab_first else "dv"


def _chunk_logits(h_GxCxD: Array, w: Array, cap: float | None, vocab_first: bool = False) -> Array:
    """float32 logits of one chunk (soft-capped when `cap` is set)."""
    spec = f"gcd,{_w_spec(vocab_first)}->gcv"
    logits_GxCxV = jnp.einsum(spec, h_GxCxD, w, preferred_element_type=jnp.float32)
    return logits_GxCxV if cap is None else cap * jnp.tanh(logits_GxCxV / cap)


def _slice(x, i, C: int):
    """Chunk i (positions [i C, (i + 1) C)) of a [G, T', ...] array, T' a multiple of C."""
    return jax.lax.dynamic_slice_in_dim(x, i * C, C, axis=1)


def _put(x, chunk, i, C: int):
    return jax.lax.dynamic_update_slice_in_dim(x, chunk, i * C, axis=1)


def _scored_forward(h_GxTxD, w, t_GxT, n_chunks, C: int, cap: float | None, vocab_first: bool):
    """Target log-probs [G, T] and the log-sum-exp [G, T] of the
    first `n_chunks` chunks of C positions; the positions after them are 0."""

    def body(i, carry):
        logp_GxT, lse_GxT = carry
        logits_GxCxV = _chunk_logits(_slice(h_GxTxD, i, C), w, cap, vocab_first)
        lse_GxC = jax.nn.logsumexp(logits_GxCxV, axis=-1)
        target_GxC = jnp.take_along_axis(logits_GxCxV, _slice(t_GxT, i, C)[..., None], axis=-1)[..., 0]
        logp_GxC = target_GxC - lse_GxC
        return _put(logp_GxT, logp_GxC, i, C), _put(lse_GxT, lse_GxC, i, C)

    zeros = jnp.zeros_like(t_GxT, jnp.float32)  # sharded like the groups (explicit sharding mode)
    return jax.lax.fori_loop(0, n_chunks, body, (zeros, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _scored_logprobs(h_GxTxD, w, t_GxT, n_chunks, C: int, cap: float | None, vocab_first: bool):
    return _scored_forward(h_GxTxD, w, t_GxT, n_chunks, C, cap, vocab_first)[0]


def _scored_logprobs_fwd(h_GxTxD, w, t_GxT, n_chunks, C, cap, vocab_first):
    logp_GxT, lse_GxT = _scored_forward(h_GxTxD, w, t_GxT, n_chunks, C, cap, vocab_first)
    return logp_GxT, (h_GxTxD, w, t_GxT, n_chunks, lse_GxT)


def _scored_logprobs_bwd(C, cap, vocab_first, residuals, g_GxT):
    """d/dz of log p(target) is onehot(target) - softmax(z) (times the soft-cap's derivative): per chunk
    the logits are recomputed (the forward kept only their log-sum-exp, [G, T]), then dh = dz W^T and
    dW += h^T dz, in W's own layout ([D, V] or [V, D]: no transposed copy of a tied embedding, nor of its
    gradient). Chunks past `n_chunks` hold no scored position: their gradient is 0, not computed."""
    h_GxTxD, w, t_GxT, n_chunks, lse_GxT = residuals
    ws = _w_spec(vocab_first)
    V = w.shape[0] if vocab_first else w.shape[-1]

    def body(i, carry):
        dh_GxTxD, dw = carry
        h_GxCxD, t_GxC, g_GxC = _slice(h_GxTxD, i, C), _slice(t_GxT, i, C), _slice(g_GxT, i, C)
        logits_GxCxV = _chunk_logits(h_GxCxD, w, cap, vocab_first)
        p_GxCxV = jnp.exp(logits_GxCxV - _slice(lse_GxT, i, C)[..., None])
        onehot_GxCxV = jax.nn.one_hot(t_GxC, V, dtype=jnp.float32)
        dz_GxCxV = g_GxC[..., None] * (onehot_GxCxV - p_GxCxV)
        if cap is not None:
            dz_GxCxV = dz_GxCxV * (1.0 - jnp.square(logits_GxCxV / cap))
        dh_GxCxD = jnp.einsum(f"gcv,{ws}->gcd", dz_GxCxV, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum(f"gcd,gcv->{ws}", h_GxCxD, dz_GxCxV, preferred_element_type=jnp.float32)
        return _put(dh_GxTxD, dh_GxCxD.astype(dh_GxTxD.dtype), i, C), dw

    init = (jnp.zeros_like(h_GxTxD), jnp.zeros_like(w, jnp.float32))
    dh_GxTxD, dw = jax.lax.fori_loop(0, n_chunks, body, init)
    # Integer inputs (targets, the chunk count) take float0 cotangents.
    return (
        dh_GxTxD,
        dw.astype(w.dtype),
        np.zeros(t_GxT.shape, jax.dtypes.float0),
        np.zeros((), jax.dtypes.float0),
    )


_scored_logprobs.defvjp(_scored_logprobs_fwd, _scored_logprobs_bwd)


def _chunked(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    chunk_size: int,
    logit_soft_cap: float | None,
    mask_BxT: Array | None = None,
    row_groups: int = 1,
    vocab_first: bool = False,
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
    hidden_GxTxD = hidden_BxTxD.reshape(row_groups, -1, D)
    V = unembed_DxV.shape[0] if vocab_first else unembed_DxV.shape[-1]
    targets_GxT = _safe_targets(targets_BxT.reshape(row_groups, -1), V)
    G, T, _ = hidden_GxTxD.shape
    if mask_BxT is not None:
        # Completion-only: a stable sort of each group puts its scored positions first (in order), so the
        # chunks past the group's count of scored positions hold none and are not run. Only the order of
        # the positions changes (the per-position numbers do not); they are put back at the end.
        keep_GxT = mask_BxT.reshape(row_groups, -1) > 0
        perm_GxT = jnp.argsort(~keep_GxT, axis=-1, stable=True)
        hidden_GxTxD = jnp.take_along_axis(hidden_GxTxD, perm_GxT[..., None], axis=1)
        targets_GxT = jnp.take_along_axis(targets_GxT, perm_GxT, axis=1)
        keep_GxT = jnp.take_along_axis(keep_GxT, perm_GxT, axis=1)
        scored = jnp.max(jnp.sum(keep_GxT, axis=-1))  # the fullest group's (chunks run over all groups)
    else:
        keep_GxT = jnp.ones((G, T), jnp.bool_)
        scored = jnp.int32(T)
    C = min(chunk_size, T)
    pad = -T % C
    hidden_GxTxD = jnp.pad(hidden_GxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_GxT = jnp.pad(targets_GxT, ((0, 0), (0, pad)))
    n_chunks = ((scored + C - 1) // C).astype(jnp.int32)
    # A loop over exactly the chunks that hold scored positions, with a hand-written backward
    # (`_scored_logprobs_bwd`): no [G, T, V] float32 tensor exists, forward or backward, and the backward
    # keeps only the log-sum-exp of each position besides the inputs.
    args = (hidden_GxTxD, unembed_DxV, targets_GxT, n_chunks, C, logit_soft_cap, vocab_first)
    logp_GxT = _scored_logprobs(*args)
    logp_GxT = jnp.where(keep_GxT, logp_GxT[:, :T], 0.0)
    if mask_BxT is not None:
        logp_GxT = jnp.take_along_axis(logp_GxT, jnp.argsort(perm_GxT, axis=-1), axis=1)
    return logp_GxT.reshape(B0, T0), n_chunks


def token_logprobs_from_hidden(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    *,
    mask_BxT: Array | None = None,
    chunk_size: int = 128,
    logit_soft_cap: float | None = None,
    row_groups: int = 1,
    vocab_first: bool = False,
) -> Array:
    """Target log-probs from final hidden states and the unembedding, float32 [B, T].

    Same numbers as ``token_logprobs(hidden @ unembed, targets)`` (with ``cap * tanh(logits / cap)`` applied
    when ``logit_soft_cap`` is set, as Gemma-2 does), but the logits are built ``chunk_size`` positions at a
    time in a loop with a hand-written backward that recomputes each chunk's logits from the kept
    log-sum-exp: peak extra memory is one float32 [row_groups, chunk_size, V] block (and its gradient),
    forward and backward. Each group's length is padded up to a multiple of the chunk. The matmul
    accumulates in float32 whatever the dtype of ``hidden_BxTxD`` / ``unembed_DxV``
    (e.g. bfloat16).

    With ``mask_BxT``, only positions where it is > 0 are scored (the others are 0): the rows are laid end to
    end in ``row_groups`` groups, each group's scored positions are gathered to its front (a stable sort,
    same shapes) and the chunks holding none of any group are skipped, so the unembedding costs ~ the
    scored positions (rounded up to chunks) instead of B x T. ``row_groups`` must divide B; when the rows
    are sharded over devices, pass the number of batch shards so each group lives on one device (the
    default, 1, sorts across all rows).

    ``vocab_first=True``: ``unembed_DxV`` is given as [V, D] instead, e.g. a tied embedding matrix as it
    is stored; it is contracted in that layout, forward and backward, and so is its gradient (no
    transposed copy of a [V, D] matrix and of its gradient: 2 x 113 MB for a 49k x 576 float32 vocabulary).
    """
    return _chunked(
        hidden_BxTxD,
        unembed_DxV,
        targets_BxT,
        chunk_size,
        logit_soft_cap,
        mask_BxT=mask_BxT,
        row_groups=row_groups,
        vocab_first=vocab_first,
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
