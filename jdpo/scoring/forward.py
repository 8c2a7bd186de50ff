"""The policy forward: per-pair log-probs of a typed batch, and of every pair of a split.

`pair_logprobs` is the one forward of a model over a `jdpo.data.batch.Batch` (the train step, the eval pass
and the reference pass all run it); `over_split` is the one loop that runs a jitted forward over every
batch of a split once and collects its per-pair results by pair id (the reference pass, in-training
eval, `jdpo eval`, the demo and `jdpo bench` use it); `split_metrics` turns a split's policy and
reference log-probs into the loss and TRL's metrics of a run's own loss settings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdpo.data.batch import Batch
from jdpo.losses import logprobs
from jdpo.losses.spec import LossSpec
from jdpo.losses.unpaired import running_moments_init
from jdpo.parallel.context_layout import join_rows, split_rows, splits
from jdpo.parallel.sharding import batch_shards
from jdpo.report import metrics
from jdpo.scoring import batch_loss


def pair_logprobs(
    model: Any, batch: Batch, *, chunk_size: int = 1024, dropout_key=None, router_stats: bool = False
) -> dict[str, jax.Array]:
    """Summed completion log-probs and token counts of every pair slot of a packed batch.

    One forward over chosen and rejected together (they are segments of the same rows), float32
    log-probs computed from the final hidden states in chunks of positions (never a [B, T, V] float32
    tensor), of the completion tokens only: positions with `loss_mask` = 0 are not projected onto the
    vocabulary (`logprobs.token_logprobs_from_hidden`'s `mask_BxT`). Pair k of a row has its chosen
    sequence in segment 2k+1 and its rejected in 2k+2.

    Args:
      model: a `jdpo.models.Transformer` (inside jit: merged from graphdef + params).
      batch: a `Batch` ([B, T] token arrays, pair_ids [B, P]).
      dropout_key: the training policy forward's key for LoRA dropout (None: no dropout).
      router_stats: also return an MoE model's router statistics under "router" (the train step's
        policy forward: `Transformer.hidden_and_router`).
    Returns `chosen`, `rejected` [B, P] float32 summed log-probs and `chosen_counts`,
    `rejected_counts` [B, P] float32 completion token counts (0 in empty slots).
    """
    P = batch.pair_ids.shape[1]
    hidden_BxTxD, router = model.hidden_and_router(
        batch.input_ids, batch.positions, batch.segment_ids, dropout_key, batch.slots
    )
    # A row split over the mesh's context axis is scored shard by shard (`split_rows`: each device's
    # C-th of a row as a row of its own), its per-segment sums added over the shards (`join_rows`).
    parts = splits(batch.input_ids.shape[1])
    hidden_RxLxD, targets_RxL, mask_RxL, segments_RxL = (
        split_rows(x) for x in (hidden_BxTxD, batch.targets, batch.loss_mask, batch.segment_ids)
    )
    unembed, vocab_first = model.unembedding_as_stored()
    logp_RxL = logprobs.token_logprobs_from_hidden(
        hidden_RxLxD,
        unembed,
        targets_RxL,
        vocab_first=vocab_first,
        mask_BxT=mask_RxL,
        chunk_size=chunk_size,
        logit_soft_cap=model.config.final_logit_softcapping,
        # One group of rows per batch (and context) shard: each device sorts and chunks its own scored
        # positions.
        row_groups=batch_shards(batch.input_ids.shape[0]) * parts,
    )
    logps_RxS, counts_RxS = logprobs.segment_logprobs(logp_RxL, mask_RxL, segments_RxL, 2 * P)
    logps_BxS, counts_BxS = join_rows(logps_RxS, parts), join_rows(counts_RxS, parts)
    out = {
        "chosen": logps_BxS[:, 0::2],
        "rejected": logps_BxS[:, 1::2],
        "chosen_counts": counts_BxS[:, 0::2].astype(jnp.float32),
        "rejected_counts": counts_BxS[:, 1::2].astype(jnp.float32),
    }
    if router_stats:
        out["router"] = router
    return out


@dataclasses.dataclass
class PairLogps:
    """Per-pair log-probs of one split, indexed by pair id: chosen / rejected [N] float32 (summed over
    the completion), chosen_counts / rejected_counts [N] int32, and computed [N] bool: the pairs a
    forward ran over. Pairs the batches never held (longer than a row, so never trained on either) are
    not computed: their entries are 0, never a value, and looking one up is an error."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_counts: np.ndarray
    rejected_counts: np.ndarray
    computed: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)

    def lookup(self, pair_ids_BxP: np.ndarray) -> dict[str, np.ndarray]:
        """`ref_chosen_logps`, `ref_rejected_logps` [B, P] float32 for a batch's pair ids (0 for -1)."""
        ids = np.asarray(pair_ids_BxP)
        safe = np.where(ids >= 0, ids, 0)
        valid = ids >= 0
        missing = valid & ~self.computed[safe]
        if missing.any():
            raise ValueError(
                f"no reference log-probs for pairs {sorted(set(ids[missing].tolist()))[:8]}: the reference "
                "pass did not hold them (a cache made with other row / packing settings?)"
            )
        return {
            "ref_chosen_logps": np.where(valid, self.chosen[safe], 0.0).astype(np.float32),
            "ref_rejected_logps": np.where(valid, self.rejected[safe], 0.0).astype(np.float32),
        }

    def attach(self, batch: Batch) -> Batch:
        """`batch` with these log-probs of its slots attached as its reference."""
        ref = self.lookup(batch.pair_ids)
        return batch.with_reference(ref["ref_chosen_logps"], ref["ref_rejected_logps"])

    def save(self, file) -> None:
        """np.savez to a path or a binary file object."""
        np.savez(file, **dataclasses.asdict(self))

    @classmethod
    def load(cls, file) -> PairLogps:
        """From a path or a binary file object written by `save`; KeyError when a field is missing."""
        with np.load(file) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def empty(cls, num_pairs: int) -> PairLogps:
        return cls(
            chosen=np.zeros(num_pairs, np.float32),
            rejected=np.zeros(num_pairs, np.float32),
            chosen_counts=np.zeros(num_pairs, np.int32),
            rejected_counts=np.zeros(num_pairs, np.int32),
            computed=np.zeros(num_pairs, bool),
        )


def over_split(
    forward: Callable[[Any, Batch], dict], params: Any, batches: Iterable[Batch], num_pairs: int, *, mesh
) -> PairLogps:
    """Run `forward(params, device batch)` (a jitted `pair_logprobs`) over `batches` (one pass over a
    split: host-side `Batch`es, each process its own rows) and scatter the results by pair id.

    One batch stays in flight: the next forward is dispatched before the previous result is pulled to
    the host. On a multi-host run the results are gathered so that every process holds the whole
    split's arrays.
    """
    out = PairLogps.empty(num_pairs)
    pending = None
    for batch in batches:
        result = (batch.pair_ids, forward(params, batch.without_reference().on_mesh(mesh)))
        if pending is not None:
            _scatter(out, *pending)
        pending = result
    if pending is not None:
        _scatter(out, *pending)
    return out


def _scatter(out: PairLogps, pair_ids_BxP, res: dict) -> None:
    from jax.experimental import multihost_utils

    ids = np.asarray(pair_ids_BxP)
    if jax.process_count() > 1:
        # Host-local pair ids are this host's rows; the forward's outputs are global arrays. Gathered,
        # both come back whole (rows in process order) on every process.
        ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
        res = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in res.items()}
    else:
        res = {k: np.asarray(jax.device_get(v)) for k, v in res.items()}
    if res["chosen"].shape[0] != ids.shape[0]:
        raise ValueError(
            f"forward returned {res['chosen'].shape[0]} rows for {ids.shape[0]} rows of pair ids"
        )
    valid = ids >= 0
    sel = ids[valid]
    out.chosen[sel] = res["chosen"][valid]
    out.rejected[sel] = res["rejected"][valid]
    out.chosen_counts[sel] = np.rint(res["chosen_counts"][valid]).astype(np.int32)
    out.rejected_counts[sel] = np.rint(res["rejected_counts"][valid]).astype(np.int32)
    out.computed[sel] = True


def split_metrics(
    policy: PairLogps, reference: PairLogps | None, loss: LossSpec, *, labels=None, moments=None, beta=None
) -> dict[str, float]:
    """The loss and TRL's metrics (eval/ names) of a whole split under the run's `loss`
    (`loss.for_eval`): the mean over every pair both forwards computed (`jdpo.scoring.batch_loss`).
    `reference` may be None for the reference-free losses; `beta` (a scalar array or float): the adaptive
    schedule's current beta (the train state's) in place of `loss.beta`.

    Unpaired losses: `labels` [N] are the split's (`TokenizedPairs.labels`), kto's z_0 is estimated over
    the whole split's KL completions, bco's delta is `moments`' mean (the train state's; without it the
    initial 0). A split of pairs (`labels` None, e.g. `jdpo eval` on paired data) under an unpaired loss
    gets the pairwise reward metrics (preference accuracy, margins) and the sigmoid loss at its beta: the
    implicit reward beta * (policy - reference) is the same. WPO weights do not enter the eval loss."""
    loss = loss.for_eval(labelled=labels is not None)
    if loss.running_reward_mean and moments is None:
        moments = running_moments_init()
    # Pairs a forward did not compute hold 0 (finite) and are weighted 0.
    valid = policy.computed & (reference.computed if reference is not None else True)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    logps = {k: f32(getattr(policy, k)) for k in ("chosen", "rejected", "chosen_counts", "rejected_counts")}
    slot_loss, m, _ = batch_loss.slot_losses(
        loss,
        logps,
        None if reference is None else f32(reference.chosen),
        None if reference is None else f32(reference.rejected),
        f32(valid),
        labels=None if labels is None else jnp.asarray(labels),
        moments=moments,
        update=False,
        beta=None if beta is None else float(jax.device_get(beta)),
    )
    sums = {k: jnp.sum(v) for k, v in m.items()}
    sums["loss"], sums["pairs"] = jnp.sum(slot_loss), jnp.sum(f32(valid))
    means = batch_loss.step_means(loss, sums)
    out = {metrics.eval_name(k): float(v) for k, v in means.items() if k != "pairs"}
    return out
