"""Device mesh, the one table of logical-axis -> mesh-axis rules, and sharding helpers.

Every parameter carries logical axis names in its `out_sharding` metadata (e.g. ("embed", "mlp")) and
activations are constrained with logical names too; `LOGICAL_AXIS_RULES` is the only place that decides
which mesh axis each name lands on.

Divisibility: when a shape is given, a dimension whose size does not divide by the product of its mesh
axes is replicated instead (e.g. 8 KV heads on a tensor axis of 16, or a vocab of 50257 over 8 devices).
That costs memory, never correctness, and keeps tiny test models and odd vocabularies runnable on any mesh.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jdpo.parallel import host_memory

# "expert": MoE experts sharded over it (expert parallelism, `jdpo.models.expert_parallel`); it also
# splits the batch rows, so the layers around the experts run data-parallel over it. "context": the axis
# over which every row's tokens are split (long context, `jdpo.parallel.context_layout`).
MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")
CONTEXT_AXIS = "context"

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
# Parameters: the model dimension is split over fsdp (ZeRO-3 style: gathered per layer in the forward) and
# context (the devices that split a row hold a share of the weights too, as MaxText does),
# the "wide" dimensions (vocab, heads, mlp) over tensor. Activations: rows over data x fsdp, the wide
# dimensions over tensor; the model dimension of activations stays whole ("act_embed"); the token axis of
# activations ("length") over context (a row's tokens split across devices; size 1 by default).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "embed": ("fsdp", "context"),
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "expert": "expert",
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": "context",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, *, expert: int = 1, context: int = 1, devices=None
) -> Mesh:
    """A ("data", "fsdp", "tensor", "expert", "context") mesh with explicit-free (Auto) axis types.

    One of the sizes may be -1, meaning "all remaining devices" (e.g. `make_mesh(fsdp=-1)`). `context`
    splits every row's tokens (`jdpo.parallel.context_layout`); it is never -1.
    """
    devices = list(jax.devices() if devices is None else devices)
    if context < 1:
        raise ValueError(f"the context axis must be a positive size, got {context}")
    shape = [data, fsdp, tensor, expert, context]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor} "
                         f"expert={expert}")  # fmt: skip
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes ({known})")
        shape[shape.index(-1)] = len(devices) // known
    total = int(np.prod(shape))
    if total > len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {total} devices, have {len(devices)}"
        )
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices[:total])


def _axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: dict | None = None,
) -> PartitionSpec:
    """Logical axis names -> PartitionSpec through `LOGICAL_AXIS_RULES`.

    With `shape` and `mesh`, mesh axes of size 1 are dropped and a dimension that does not divide by its
    mesh axes is replicated. A mesh axis already used by an earlier dimension is not reused (a spec may
    name each mesh axis once).
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if names is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axes = [a for a in _axes(rules.get(name)) if a not in used]
        if mesh is not None:  # (a mesh without an axis of the rules: size 1)
            axes = [a for a in axes if dict(mesh.shape).get(a, 1) > 1]
        if shape is not None and mesh is not None and axes:
            if shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                axes = []  # replicate a dimension that does not divide (see module docstring)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names: Sequence[str | None] | None, shape: Sequence[int] | None = None):
    """NamedSharding for an array with these logical axis names (and optionally this shape)."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, *, accum: bool = False) -> NamedSharding:
    """Rows over ("data", "fsdp", "expert"), every other dimension replicated: for [B, T, ...] batch
    arrays; with `accum` a leading micro-batch axis [A, B, T, ...] that is not sharded."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh)
    return NamedSharding(mesh, PartitionSpec(None, *spec) if accum else spec)


def row_shards(mesh: Mesh | None) -> int:
    """Into how many shards a mesh splits batch rows (the product of the mesh axes "batch" maps to; 1
    without a mesh). A global batch's row count must divide by it."""
    if mesh is None:
        return 1
    return spec_entry_size(mesh, logical_to_spec(("batch",), mesh=mesh)[0])


def round_rows(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of `row_shards(mesh)` (callers fill the extra rows with padding)."""
    shards = row_shards(mesh)
    return -(-rows // shards) * shards


class OnMesh:
    """A jitted function that is always traced and run with its mesh set (`jax.set_mesh`), so the
    model's logical activation constraints resolve against it. Other attributes (e.g. `lower`,
    `_cache_size`) are the jitted function's.

    `compile_apart`: each new signature (the shapes, dtypes and shardings of the arguments) is compiled
    ahead of time and the compiler's freed heap handed back (`host_memory.release_free_heap`) before the
    program first runs, so the step's buffers are not laid out beside it (the train step: ~0.3 GiB of a
    135M model's peak); `_cache_size` then counts those programs."""

    def __init__(self, fn, mesh: Mesh | None, *, compile_apart: bool = False):
        self.fn, self.mesh = fn, mesh
        self._programs: dict | None = {} if compile_apart else None

    def __call__(self, *args, **kwargs):
        if self._programs is not None and not kwargs:
            key = _signature(args)
            program = self._programs.get(key)
            if program is None:
                program = self._programs[key] = self.lower(*args).compile()
                host_memory.release_free_heap()
            return program(*args)
        if self.mesh is None:
            return self.fn(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def _cache_size(self) -> int:
        return len(self._programs) if self._programs is not None else self.fn._cache_size()

    def lower(self, *args):
        """Ahead-of-time lowering, under the mesh like a call."""
        if self.mesh is None:
            return self.fn.lower(*args)
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)

    def __getattr__(self, name: str):
        return getattr(self.fn, name)


def jit_on_mesh(fn, mesh: Mesh | None, *, compile_apart: bool = False, **jit_kwargs) -> OnMesh:
    """`jax.jit(fn, **jit_kwargs)`, traced and run under `mesh` (no mesh: a plain jit). The one way every
    jitted entry point (train, eval, the reference pass, generation) is set up. `compile_apart`: see
    `OnMesh`."""
    return OnMesh(jax.jit(fn, **jit_kwargs), mesh, compile_apart=compile_apart)


def _signature(args) -> tuple:
    """What a compiled program is specific to: the pytree structure and each leaf's shape, dtype and
    sharding (weak type included, as jit keys it)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (x.shape, x.dtype, getattr(x, "sharding", None), getattr(x, "weak_type", False))
        if hasattr(x, "shape")
        else (type(x),)  # a Python scalar is a traced argument: its value needs no program of its own
        for x in leaves
    )


def current_mesh():
    """The mesh set with `jax.set_mesh` (or None when there is none or it is empty)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def batch_shards(num_rows: int) -> int:
    """Into how many shards the current mesh (`jax.set_mesh`) splits `num_rows` batch rows inside a
    traced function: `row_shards`, or 1 without a mesh or when the rows do not divide (replicated)."""
    shards = row_shards(current_mesh())
    return shards if num_rows % shards == 0 else 1


def context_size(mesh=None) -> int:
    """How many devices split each row's tokens: the "context" axis of `mesh` (default: the current
    mesh, `jax.set_mesh`); 1 without a mesh or without the axis."""
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None or CONTEXT_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[CONTEXT_AXIS])


def spec_entry_size(mesh, entry) -> int:
    """How many devices one PartitionSpec entry (None, a mesh axis name or a tuple of them) splits over."""
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return int(np.prod([mesh.shape[a] for a in axes]))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names, a no-op outside a mesh context.

    Used on activations inside the model so XLA keeps batch rows on data x fsdp and the wide dimensions
    on tensor instead of guessing.
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_shardings(state, mesh: Mesh | None):
    """Shardings for an (abstract) nnx.State, from each Variable's `out_sharding` logical names.

    Returns a tree of the same structure (each Variable holding a NamedSharding instead of its array), so it
    can be passed directly as `jax.jit(..., out_shardings=...)` for a function returning that state. With
    mesh=None everything goes on the first device.
    """
    from flax import nnx

    def one(v):
        if mesh is None:
            return v.replace(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return v.replace(named_sharding(mesh, v.get_metadata().get("out_sharding"), v.get_value().shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
