"""Attention over a row split across the mesh's "context" axis (long context, `mesh.context`).

Each device holds T / C tokens of every row in the balanced layout (`jdpo.parallel.context_layout`:
chunks i and 2C - 1 - i) and keeps its queries; the keys and values of the whole row reach it one of
two ways (`model.context_attention`):

  all_gather  every device gathers the row's k / v (an all-gather over "context", [B, T, K, H] each:
              grouped-query heads keep them small) and runs the blocked kernel on its two query chunks
              against the whole row (`attention._local` with the chunks' row slots). The backward's
              dk / dv are summed back to their owners by the all-gather's transpose (a reduce-scatter).
              Rows the host dealt in blocks (`jdpo.data.context_balance`, `model.context_balance:
              blocks`: each device's shard a balanced set of blocks, `mask.slots_BxT` their natural
              slots) take this path only: the gathered k / v go back to natural order by the slots,
              and the queries' slots say where each query tile lies.
  ring        (`jdpo.models.ring.ring_local`) the k / v shards travel around the ring with `ppermute`, one
              step per device, each step's partial attention merged by its log-sum-exp: only two
              shards of k / v live on a device at a time.

Both visit only the key blocks a query block can see (its segment, its shared prefix, the causal past),
so a key shard no query of this device sees costs nothing but its transfer. Segment ids are gathered
whole (int32 [B, T]): the visibility rule needs every key's segment.

The ring also runs a Pallas kernel as each step's kernel (`jdpo.models.ring_pallas`): TPU Splash
attention (`kernel="splash"`) or jdpo's own Pallas GPU flash kernel (`kernel="pallas_gpu"`,
`jdpo.models.flash_gpu`: separate query and key segment ids and a query offset, which jax's Pallas GPU
kernel lacks). xla takes no query shard and is refused with mesh.context > 1
(`jdpo.models.choices.context_refusal`, with the reason).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jdpo.models import attention, ring, ring_pallas
from jdpo.parallel import context_layout
from jdpo.parallel.sharding import CONTEXT_AXIS, context_size, current_mesh, logical_to_spec, spec_entry_size

CONTEXT_ATTENTION = ("auto", "all_gather", "ring")


def _all_gather_local(q, k, v, seg, *extra, C, scale, softcap, block, dealt=False):
    """One device: its query shard against the gathered row, in its natural order. The shard is
    chunks i and 2C - 1 - i (the balanced layout) or, `dealt`, blocks dealt by the host whose natural
    slots come first in `extra` (`jdpo.data.context_balance`); then the window, if any."""
    if dealt:
        slots, window = extra[0], extra[1:]
        k_all, v_all, seg_all = (context_layout.gather_dealt(x, slots) for x in (k, v, seg))
    else:
        window, slots = extra, context_layout.local_slots(q.shape[1], C)
        k_all, v_all, seg_all = (context_layout.gather_keys(x, C) for x in (k, v, seg))
    return attention._local(
        q, k_all, v_all, seg_all, window[0] if window else None,
        scale=scale, softcap=softcap, block=block, q_slots=slots,
    )  # fmt: skip


def context_attention(
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask, *, scale, softcap=None, block=attention.DEFAULT_BLOCK, how="auto",
    kernel="blocked", sliding_window=None, interpret=None,
):  # fmt: skip
    """Exact causal self-attention of packed rows split over "context" (balanced layout); same contract
    as `attention.blocked_attention`. `how`: all_gather, ring, or auto (all_gather for the blocked kernel:
    see the README's measurement; ring for splash and pallas_gpu). `kernel`: blocked, splash or
    pallas_gpu (the last two in the ring only, `ring_pallas`; `sliding_window` is the model's static
    window, read when `mask.window` is traced; `interpret`: Pallas' interpreter, None: off on the
    kernel's own backend)."""
    if not (mask.self_attention and mask.causal):
        raise ValueError("context attention takes causal self-attention masks (no KV cache)")
    if kernel not in ("blocked", *ring_pallas.KERNELS):
        raise ValueError(f"context attention runs the blocked, splash or pallas_gpu kernel, not {kernel!r}")
    if kernel != "blocked" and how == "all_gather":
        raise ValueError(f"the {kernel} kernel runs rows split over context in the ring only")
    mesh, C, T = current_mesh(), context_size(), q_BxTxNxH.shape[1]
    if context_layout.splits(T) != C:
        raise ValueError(f"rows of {T} tokens do not split into 2 x context = {2 * C} chunks")
    dealt = mask.slots_BxT is not None
    if dealt and (kernel != "blocked" or how == "ring"):
        raise ValueError(
            "rows dealt over context in blocks (model.context_balance: blocks) run the blocked kernel with "
            f"the all-gather, not {kernel} in the {how} path"
        )
    if kernel != "blocked":
        if isinstance(mask.window, int):  # it reaches the kernel traced (below): name its static value
            sliding_window = mask.window
        fn = functools.partial(
            ring_pallas.ring_pallas_local, C=C, scale=scale, softcap=softcap, block=block,
            sliding_window=sliding_window, interpret=interpret, kernel=kernel,
        )  # fmt: skip
    else:
        tile = context_layout.shard_block(T, C, block)
        fn = functools.partial(
            ring.ring_local if how == "ring" else functools.partial(_all_gather_local, dealt=dealt),
            C=C, scale=scale, softcap=softcap, block=tile,
        )  # fmt: skip
    args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask.segment_ids_BxT) + ((mask.slots_BxT,) if dealt else ())
    replicated = () if mask.window is None else (jnp.asarray(mask.window, jnp.int32),)
    specs = shard_specs(mesh, q_BxTxNxH, k_BxTxKxH)
    in_specs = specs + specs[3:] * dealt + (PartitionSpec(),) * len(replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=specs[0], check_vma=False)(
        *args, *replicated
    )


def shard_specs(mesh, q_BxTxNxH, k_BxTxKxH):
    """(q, k, v, segment ids) PartitionSpecs of a context shard: rows over the batch axes, tokens over
    "context", heads over tensor when both N and K divide by it."""
    rows = logical_to_spec(("batch",), q_BxTxNxH.shape[:1], mesh)[0]
    heads = logical_to_spec((None, None, "act_kv_heads", None), k_BxTxKxH.shape, mesh)[2]
    if heads is not None and q_BxTxNxH.shape[2] % spec_entry_size(mesh, heads):
        heads = None
    qspec = PartitionSpec(rows, CONTEXT_AXIS, heads, None)
    return qspec, qspec, qspec, PartitionSpec(rows, CONTEXT_AXIS)
