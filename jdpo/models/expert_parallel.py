"""Expert parallelism: the experts of an MoE layer sharded over the mesh's "expert" axis (`mesh.expert`).

The "expert" axis also splits the batch rows (`jdpo.parallel.sharding`: "batch" -> data x fsdp x
expert), so attention and the dense parts run data-parallel over it. In an MoE layer each of the X
devices of an expert group holds E / X experts and m of the group's tokens; the exchange is an
all-gather of the group's tokens and their routing (X m rows), each device running its own experts on
the assignments routed to them (sorted by local expert, one `ragged_dot` per projection; assignments to
other devices' experts fall past the groups and come out zero), then a reduce-scatter that sums every
token's k expert outputs back onto the device that holds the token. On the small expert groups this runs
on (X <= 8) the all-gather moves (X - 1) m D values per device like an all-to-all's worst case, without
the capacity an all-to-all's fixed buffers would need, so the dispatch stays dropless.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jdpo.models.dispatch import ragged_experts
from jdpo.parallel.sharding import current_mesh, logical_to_spec

EXPERT_AXIS = "expert"


def expert_axis_size() -> int:
    """The size of the current mesh's "expert" axis (1 without a mesh or without the axis)."""
    mesh = current_mesh()
    return 1 if mesh is None else dict(mesh.shape).get(EXPERT_AXIS, 1)


def _local_assignments(experts_MxK, num_local: int, first):
    """Local expert ids of the assignments: e - first for this device's experts, num_local (past every
    group) for the others."""
    local = experts_MxK - first
    return jnp.where((local >= 0) & (local < num_local), local, num_local)


def sharded_experts(x_MxD, experts_MxK, weights_MxK, kernels: dict, expert_fn, num_experts: int):
    """The MoE output [M, D] with the experts sharded over the current mesh's "expert" axis. Every entry of
    `kernels` has a leading [E] axis (a quantised base's codes and scales too: each device dequantises
    its own experts inside `expert_fn`); their other axes are gathered whole per device (an fsdp split of
    the model dimension, as FSDP gathers a layer's weights)."""
    mesh = current_mesh()
    X = expert_axis_size()
    if num_experts % X:
        raise ValueError(f"{num_experts} experts do not divide over mesh.expert={X}")
    rows = logical_to_spec(("batch", None), x_MxD.shape, mesh)
    expert = PartitionSpec(EXPERT_AXIS)

    def body(x_mxD, experts_mxK, weights_mxK, kernels):
        gather = functools.partial(jax.lax.all_gather, axis_name=EXPERT_AXIS, tiled=True)
        num_local = next(iter(kernels.values())).shape[0]
        first = jax.lax.axis_index(EXPERT_AXIS) * num_local
        local_MxK = _local_assignments(gather(experts_mxK), num_local, first)
        y_MxD = ragged_experts(gather(x_mxD), local_MxK, gather(weights_mxK), kernels, expert_fn, num_local)
        return jax.lax.psum_scatter(y_MxD, EXPERT_AXIS, tiled=True)

    if EXPERT_AXIS not in _axes(rows[0]):
        raise ValueError(f"the rows are not split over the {EXPERT_AXIS!r} mesh axis (spec {rows})")
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows, rows, rows, {k: expert for k in kernels}),
        out_specs=rows,
        check_vma=False,
    )
    return run(x_MxD, experts_MxK, weights_MxK, kernels)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
