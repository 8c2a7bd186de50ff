"""`jdpo plan`: expected memory per device of a run, before launching it.

    plan = plan_memory(model_config, cfg, num_devices=8)   # nothing is allocated
    print(format_plan(plan, device_memory=parse_size("80GiB")))

The parameter count and every parameter's shape come from `nnx.eval_shape` of the real model (the
config.json of `model.path`, or a bare HF config.json), and each parameter's per-device share from the
same logical-axis rules table the trainer uses (`jdpo.parallel.sharding.logical_to_spec`, with its divisibility
fallback), on a mesh of the configured ("data", "fsdp", "tensor") sizes. So a planned 8-device run
replicates exactly what the real run would replicate.

What is counted, per device (B = rows per device of one micro-batch, T = row length, b = bytes of the
compute dtype; D, N, K, H, F, V, L as in docs/DESIGN.md; N, K, F and V are divided by the tensor axis when
they divide by it):

  parameters      every parameter in `model.param_dtype`, sharded by the rules
  gradients       float32, sharded like the parameters: the train step accumulates micro-batch
                  gradients in float32 before the update
  optimizer       AdamW state from `jax.eval_shape(optimizer.init)` (two moments shaped like the
                  parameters, in the parameter dtype), sharded like the parameters
  reference       online reference only: a frozen copy of the parameters
  LoRA            with lora.rank > 0 the parameters are the frozen base (its projection kernels, and an
                  MoE model's stacked expert kernels, int8 plus a float32 scale per output channel with
                  lora.quantize: int8; 4-bit codes plus a float32 scale per 64 weights with nf4) and the
                  adapters;
                  gradients, optimizer state and the online reference count the adapters only, and
                  the activations add each adapted projection's rank-r intermediate x A, L * targets *
                  r * b per token
  activations     tensors saved for the backward pass, per layer and token:
                    remat none: x, ln1(x), q, k, v, attn_out, x + attn, ln2(.), gate, up, act*up
                                = (4D + 2NH + 2KH + 3F) * b, plus the attention kernel's own state
                                  (the kernel `model.attention` resolves to for the target's backend,
                                  `jdpo.models.kernels.resolve_attention`; auto: splash on TPU,
                                  pallas_gpu on NVIDIA GPUs, blocked on CPU):
                                  blocked / splash / pallas_gpu: a float32 log-sum-exp per query
                                    head, N * 4 (the backward pass recomputes the probabilities
                                    from q, k, v, the output and it); pallas_gpu keeps k and v
                                    repeated to one per query head, 2 (N - K) H * b more (not in
                                    the context ring, whose flash_gpu kernel reads them as they are)
                                  xla: the float32 attention probabilities, N * T * 4 (dense
                                    masked attention stores them)
                    remat dots_saveable: the matmul outputs (dots without batch dims) and the layer input
                                = (3D + NH + 2KH + 2F) * b
                    remat full: the layer input D * b
                    remat offload: nothing on the device (the layer input D * b goes to pinned host
                                memory: the "host (offload)" line, not in the device total)
                  plus, with remat, one layer's full set live again while it is recomputed, and the
                  final hidden states and their norm input 2D * b per token; with mesh.context = C a
                  device holds T / C tokens of each row, so every per-token term divides by C
  context k / v   mesh.context > 1 (`jdpo.models.context_attention`): one layer's keys and values from
                  the other devices while it attends, and their float32 gradients in the backward:
                    all_gather (auto): the whole row's, B T 2 K H (b + 4)
                    ring: the held and the incoming shard, 2 x B (T / C) 2 K H (b + 4)
  log-prob chunk  chunk x V float32 logits of the chunked log-prob loop, chunk = min(LOGPROB_CHUNK,
                  B * T): this device's rows are laid end to end as one group and projected one chunk of
                  positions at a time (`jdpo.train.step.LOGPROB_CHUNK`, the train step's chunk size)
  batch           the step's [A, B, T] int32/float32 input arrays (5 per token)
  dequantised     lora.quantize int8 / nf4: one layer's seven projection kernels dequantised into the
  layer           compute dtype while the layer runs, (D (N + 2K) H + N H D + 3 D F) * b; an MoE layer's
                  stacked experts are quantised too, and dequantised per layer: its E / X experts'
                  (this device's, X = mesh.expert) 3 D F_e each in place of the MLP's 3 D F
  reference cache on host / disk, not on the device: 16 bytes per pair (two float32 log-probs and
                  two int32 token counts), train + eval pairs

Not counted: XLA's temporary buffers beyond these (fusion scratch, collectives' staging, the
all-gathered parameters of one layer under FSDP), allocator fragmentation, the CUDA/TPU runtime.
Leave headroom: a plan above ~90% of the device's memory is reported as not fitting comfortably.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from jdpo import data as jdata
from jdpo.config import ConfigError
from jdpo.models import ModelConfig, ModelOptions, Transformer
from jdpo.models.adapters import adapter_spec, model_targets
from jdpo.models.choices import EXPERT_TARGETS, RING_KERNELS
from jdpo.models.options import layer_loop_of
from jdpo.models.kernels import ATTENTION_KERNELS, LSE_KERNELS, REPEATS_KV, resolve_attention
from jdpo.parallel.sharding import logical_to_spec
from jdpo.train.step import LOGPROB_CHUNK, make_optimizer

GiB = 2**30

#: Memory per device of named accelerators, bytes (what `--device-memory NAME` accepts).
DEVICE_MEMORY: dict[str, int] = {
    "h100": 80 * GiB,
    "h200": 141 * 10**9,
    "a100-40g": 40 * GiB,
    "a100-80g": 80 * GiB,
    "l4": 24 * GiB,
    "rtx4090": 24 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v4": 32 * GiB,
}

#: Above this share of the device's memory the plan says it does not fit comfortably: XLA scratch,
#: fragmentation and the runtime need the rest.
HEADROOM = 0.9

BATCH_ARRAYS = 5  # input_ids, positions, segment_ids, targets (int32), loss_mask (float32): 4 bytes each
REF_CACHE_BYTES_PER_PAIR = 16  # chosen/rejected log-probs float32 + chosen/rejected counts int32

log = logging.getLogger("jdpo")


def parse_size(text: str | int) -> int:
    """'80GiB' / '80G' (binary) / '80GB' (decimal) / '16e9' / plain bytes -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)", s)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 16GB, 1.5e10)")
    value, unit = float(m.group(1)), m.group(2).lower()
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
             "g": GiB, "gib": GiB, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}  # fmt: skip
    if unit not in units:
        raise ValueError(f"unknown unit {m.group(2)!r} in {text!r} (use B, KiB, MiB, GiB, GB, ...)")
    return int(value * units[unit])


def host_memory() -> int:
    """Physical memory of this host, bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(name: str | None = None) -> tuple[str, int]:
    """(description, bytes) of one device's memory: a named device (see DEVICE_MEMORY, or 'cpu' for this
    host's RAM), a size ('80GiB'), or with None the first JAX device's own limit (its memory_stats;
    host RAM on CPU)."""
    if name is not None:
        key = name.strip().lower()
        if key == "cpu":
            return "cpu (host RAM)", host_memory()
        if key in DEVICE_MEMORY:
            return key, DEVICE_MEMORY[key]
        try:
            return name, parse_size(name)
        except ValueError:
            known = ", ".join([*DEVICE_MEMORY, "cpu"])
            raise ValueError(f"unknown device {name!r}: give one of {known} or a size like 80GiB") from None
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return f"{dev.device_kind} (detected)", int(stats["bytes_limit"])
    return "cpu (host RAM, detected)", host_memory()


class _MeshShape:
    """Stands in for a jax Mesh in `logical_to_spec` (which reads only `.shape`): plans a mesh of any
    size without having its devices."""

    def __init__(self, data: int, fsdp: int, tensor: int, expert: int = 1, context: int = 1):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert, "context": context}


def resolve_mesh(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one -1 axis filled from `num_devices` (as `sharding.make_mesh`)."""
    shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if -1 in shape:
        # mesh.expert (MoE) and mesh.context (rows split over devices) are fixed axes: they take their
        # share of the devices first
        known = math.prod(s for s in shape if s != -1) * mesh_cfg.expert * mesh_cfg.context
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes ({known})")
        shape[shape.index(-1)] = num_devices // known
    return shape[0], shape[1], shape[2]


def read_model_config(path: str | os.PathLike):
    """ModelConfig from a checkpoint directory or a bare HF config.json."""

    p = Path(path)
    if not (p / "config.json").exists() and not p.is_file():
        raise FileNotFoundError(f"{path}: no config.json (give a checkpoint directory or a config.json)")
    return ModelConfig.from_hf(json.loads((p / "config.json" if p.is_dir() else p).read_text()))


@functools.lru_cache(maxsize=8)  # `longest_row` plans the same model many times
def abstract_params(model_config, *, param_dtype: str = "float32", scan_layers: bool = False, lora=None):
    """[(name, shape, dtype, logical names)] of every parameter, from `nnx.eval_shape` (no allocation).
    `lora`: a `jdpo.config.LoRASection`; with rank > 0 the adapters are included (names end in lora_a /
    lora_b)."""
    import jax.numpy as jnp
    from flax import nnx

    spec = None
    if lora is not None and lora.rank > 0:  # targets resolved to the model's projections (phi3: fused)
        spec = adapter_spec(
            model_config, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, quantize=lora.quantize
        )
    options = ModelOptions(param_dtype=jnp.dtype(param_dtype), scan_layers=scan_layers, lora=spec)
    model = nnx.eval_shape(lambda: Transformer(model_config, options=options, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            names = var.get_metadata().get("out_sharding")
            out.append((".".join(map(str, path)), tuple(value.shape), jnp.dtype(value.dtype), names))
    return out


def _local_elements(shape, names, mesh: _MeshShape) -> int:
    """Elements of one device's shard (ceil per sharded dimension)."""

    spec = logical_to_spec(names, shape, mesh)
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            n *= dim
        else:
            div = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            n *= -(-dim // div)
    return n


def _split(n: int, tensor: int) -> int:
    """A wide activation dimension's share per device: divided by the tensor axis when it divides."""
    return n // tensor if tensor > 1 and n % tensor == 0 else n


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device of each part of a run (see the module docstring for what each counts)."""

    rows: list[tuple[str, int, str]]  # (part, bytes per device, how it was counted)
    num_params: int
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    rows_per_device: int  # B, rows of one micro-batch on one device
    row_length: int  # T
    ref_cache_bytes: int | None  # host / disk, not on the device; None when the pair count is unknown
    num_pairs: int | None
    expert: int = 1  # mesh.expert (MoE experts sharded over it; it also splits the rows)
    context: int = 1  # mesh.context: devices each row is split over
    host_bytes: int = 0  # pinned host memory per device (remat: offload), not in `total`

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def part(self, name: str) -> int:
        return next(b for n, b, _ in self.rows if n == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": {n: b for n, b, _ in self.rows},
            "total_bytes": self.total,
            "num_params": self.num_params,
            "mesh": {
                **dict(zip(("data", "fsdp", "tensor"), self.mesh, strict=True)),
                "expert": self.expert,
                "context": self.context,
            },
            "host_offload_bytes": self.host_bytes,
            "rows_per_device": self.rows_per_device,
            "row_length": self.row_length,
            "ref_cache_bytes": self.ref_cache_bytes,
            "num_pairs": self.num_pairs,
        }


def target_backend(device: str) -> str | None:
    """The JAX backend of a `--device-memory` device name ("h100", "v5e", "cpu", a detected device's
    kind), None for a bare size (then: this host's backend)."""
    d = device.lower()
    if d.startswith("cpu"):
        return "cpu"
    if "tpu" in d or re.match(r"v[2-6]", d):
        return "tpu"
    if d.startswith(("h100", "h200", "a100")) or "nvidia" in d:
        return "gpu"
    return None


def _mlp_elements(c, tensor: int, expert: int) -> tuple[float, float]:
    """(elements saved per token and layer by the MLP without remat, with dots_saveable), averaged over
    the layers. Gated MLP: gate, up, act * up (3F; dots: 2F). MoE layer (`jdpo.models.moe`): the float32
    router probabilities (E, in dtype units of 2 bytes: counted as 2E), and the dispatch buffers of the
    k assignments per token, gathered from the X = mesh.expert devices of the expert group: the sorted
    token copy, gate, up, act * up and the expert outputs, X k (2D + 3F_e) (dots: X k (D + 2F_e))."""
    F, L = _split(c.intermediate_size, tensor), c.num_layers
    moe = sum(c.expert_layers)
    if not moe:
        return 3 * F, 2 * F
    D, Fe, k = c.hidden_size, _split(c.moe_intermediate_size, tensor), c.experts_per_token
    full = expert * k * (2 * D + 3 * Fe) + 2 * c.num_experts
    dots = expert * k * (D + 2 * Fe) + 2 * c.num_experts
    return ((L - moe) * 3 * F + moe * full) / L, ((L - moe) * 2 * F + moe * dots) / L


def activation_bytes_per_token(
    model_config, *, remat: str, attention: str, row_length: int, dtype_bytes: int, tensor: int = 1,
    expert: int = 1, context: int = 1,
):  # fmt: skip
    """(bytes saved per token for the whole layer stack, bytes of one layer's full set per token):
    the second is what a rematerialised layer holds again while it is recomputed. `attention` is the
    kernel (resolved, not auto): it decides whether a layer keeps N float32 log-sum-exps per token
    (blocked, splash, pallas_gpu; pallas_gpu with k / v repeated to N heads on an unsplit row, not in
    the context ring: `context` > 1 runs jdpo's flash_gpu kernel) or the N x T float32 probabilities
    (xla), the one term that grows with the row length. See the module docstring for the tensors
    counted."""

    c = model_config
    D, L = c.hidden_size, c.num_layers
    N, K, H = _split(c.num_heads, tensor), _split(c.num_kv_heads, tensor), c.head_dim
    extra = 2 * D if c.sandwich_norm else 0
    kv_heads = N if attention in REPEATS_KV and context == 1 else K
    mlp_full, mlp_dots = _mlp_elements(c, tensor, expert)
    full_elems = 4 * D + 2 * N * H + 2 * kv_heads * H + mlp_full + extra
    if attention in LSE_KERNELS:
        attn_state = N * 4  # float32 log-sum-exp per query head
    elif attention == "xla":
        attn_state = N * row_length * 4  # float32 attention probabilities
    else:
        raise ValueError(f"attention must be one of {list(ATTENTION_KERNELS)}, got {attention!r}")
    full_layer = full_elems * dtype_bytes + attn_state
    if remat == "none":
        per_layer = full_layer
    elif remat == "dots_saveable":
        per_layer = (3 * D + N * H + 2 * K * H + mlp_dots) * dtype_bytes
    elif remat == "full":
        per_layer = D * dtype_bytes
    elif remat == "offload":  # the layer input is in host memory (`host_offload_bytes_per_token`)
        per_layer = 0
    else:
        raise ValueError(f"remat must be none, dots_saveable, full or offload, got {remat!r}")
    return int(L * per_layer + 2 * D * dtype_bytes), int(0 if remat == "none" else full_layer)


def host_offload_bytes_per_token(model_config, *, remat: str, dtype_bytes: int) -> int:
    """Pinned host memory per token of `remat: offload`: every layer's input, L * D * b."""
    return model_config.num_layers * model_config.hidden_size * dtype_bytes if remat == "offload" else 0


def context_kv_bytes(model_config, *, how: str, rows: int, row_length: int, context: int, dtype_bytes: int,
                     tensor: int = 1) -> int:  # fmt: skip
    """One layer's keys / values from other devices (and their float32 gradients) under mesh.context > 1:
    the whole row's with all_gather, two shards' with the ring; 0 without a context axis."""
    if context == 1:
        return 0
    kv = 2 * _split(model_config.num_kv_heads, tensor) * model_config.head_dim * (dtype_bytes + 4)
    tokens = row_length if how in ("auto", "all_gather") else 2 * row_length // context
    return rows * tokens * kv


def dequantised_layer_bytes(model_config, *, tensor: int, expert: int, dtype_bytes: int) -> tuple[int, str]:
    """(bytes, what) of the largest layer's kernels dequantised into the compute dtype under
    lora.quantize: the attention's four projections plus the gated MLP's three (a dense layer) or this
    device's E / X experts' stacked kernels (an MoE layer; the expert-parallel dispatch dequantises a
    device's own experts only)."""
    c = model_config
    D, N, K = c.hidden_size, _split(c.num_heads, tensor), _split(c.num_kv_heads, tensor)
    attention = D * (N + 2 * K) * c.head_dim + N * c.head_dim * D
    moe = sum(c.expert_layers)
    dense = 3 * D * _split(c.intermediate_size, tensor) if moe < c.num_layers else 0
    experts = 3 * D * _split(c.moe_intermediate_size, tensor) * (c.num_experts // expert) if moe else 0
    if experts >= dense:
        what = f"4 attention kernels and {c.num_experts // expert} experts' 3 stacked kernels"
    else:
        what = "7 projection kernels"
    return (attention + max(dense, experts)) * dtype_bytes, what


def plan_memory(
    model_config,
    cfg,
    *,
    num_devices: int,
    num_pairs: int | None = None,
    on_cpu: bool = False,
    backend: str | None = None,
) -> MemoryPlan:
    """Expected memory per device of training `model_config` with the run config `cfg` on
    `num_devices` devices (fills a -1 mesh axis). Nothing is allocated; see the module docstring.
    `on_cpu`: the target is a CPU, where `model.dtype: auto` computes in float32 (else bfloat16).
    `backend`: the target's JAX backend (cpu, gpu, tpu), which decides what `model.attention: auto`
    runs; default "cpu" with `on_cpu`, else this host's."""
    import jax
    import jax.numpy as jnp
    import optax

    data, fsdp, tensor = resolve_mesh(cfg.mesh, num_devices)
    expert, context = cfg.mesh.expert, cfg.mesh.context
    mesh = _MeshShape(data, fsdp, tensor, expert, context)
    m = cfg.model
    scan_layers, remat = layer_loop_of(m, model_config)  # their "auto" resolved for this model
    dtype = jnp.dtype(m.dtype if m.dtype != "auto" else ("float32" if on_cpu else "bfloat16"))
    b = dtype.itemsize
    everything = abstract_params(
        model_config, param_dtype=m.param_dtype, scan_layers=scan_layers, lora=cfg.lora
    )
    local = {name: _local_elements(s, names, mesh) for name, s, _, names in everything}
    # What trains: every parameter, or (LoRA) the adapters alone on the frozen base.
    lora = cfg.lora.rank > 0
    params = [p for p in everything if p[0].endswith(("lora_a", "lora_b")) or not lora]
    frozen = [p for p in everything if lora and not p[0].endswith(("lora_a", "lora_b"))]
    num_params = sum(math.prod(s) for _, s, _, _ in params)
    # Weights, not stored elements: a quantised kernel's scales are not weights, and nf4 codes hold two.
    num_all = sum(
        math.prod(s) * (2 if dt == jnp.uint8 else 1)
        for name, s, dt, _ in everything
        if not name.endswith("_scale")
    )
    param_bytes = sum(local[name] * dt.itemsize for name, _, dt, _ in params)
    frozen_bytes = sum(local[name] * dt.itemsize for name, _, dt, _ in frozen)
    grad_bytes = sum(local[name] for name, _, _, _ in params) * 4

    # The optimizer's real state shapes: eval_shape of its init on the abstract parameters, each leaf
    # shaped like a parameter taking that parameter's per-device share.
    tx, _ = make_optimizer(cfg.optim, 1)
    abstract = {name: jax.ShapeDtypeStruct(s, dt) for name, s, dt, _ in params}
    share = {name: local[name] / math.prod(s) for name, s, _, _ in params}
    opt_state = jax.eval_shape(tx.init, abstract)
    per_leaf = optax.tree_map_params(
        tx,
        lambda leaf, frac: math.ceil(leaf.size * frac) * leaf.dtype.itemsize,
        opt_state,
        share,
        transform_non_params=lambda leaf: leaf.size * leaf.dtype.itemsize,
    )
    opt_bytes = int(sum(jax.tree.leaves(per_leaf)))

    T = cfg.data.row_length or 2 * cfg.data.max_length
    rows_dp = data * fsdp * expert  # the expert axis also splits the rows
    B = -(-cfg.train.batch_rows // rows_dp)
    kernel = resolve_attention(
        m.attention,
        model_config,
        backend="cpu" if on_cpu else backend,
        context=context,
        how=m.context_attention,
    ).kernel
    saved, recompute = activation_bytes_per_token(
        model_config, remat=remat, attention=kernel, row_length=T, dtype_bytes=b, tensor=tensor,
        expert=expert, context=context,
    )  # fmt: skip
    if lora:  # each adapted projection also saves its rank-r intermediate x A (an expert's: k per token)
        targets = model_targets(cfg.lora.targets, model_config)
        n_experts = sum(t in EXPERT_TARGETS for t in targets)
        per_token = model_config.num_layers * (len(targets) - n_experts)
        per_token += sum(model_config.expert_layers) * n_experts * model_config.experts_per_token
        saved += per_token * cfg.lora.rank * b
    Tl = T // context  # a device's share of each row (mesh.context)
    act_bytes = B * Tl * (saved + recompute)
    V = _split(model_config.vocab_size, tensor)
    # The scan lays this device's B rows end to end as one group of B * T positions and projects one
    # chunk of them at a time: a chunk x V float32 block, whatever B is.
    chunk = min(LOGPROB_CHUNK, B * Tl)
    chunk_bytes = chunk * V * 4
    batch_bytes = cfg.train.grad_accum * B * T * BATCH_ARRAYS * 4

    attn_note = "f32 attention probs" if kernel == "xla" else "f32 attention log-sum-exp"
    remat_note = {"none": f"no remat: all layer tensors + {attn_note}",
                  "dots_saveable": "remat dots_saveable: matmul outputs saved + one layer recomputed",
                  "full": "remat full: layer inputs saved + one layer recomputed",
                  "offload": "remat offload: layer inputs on the host + one layer recomputed",
                  }[remat]  # fmt: skip
    split = f" / context {context}" if context > 1 else ""
    active = (
        f" ({model_config.num_active_params():,} active: {model_config.experts_per_token} of "
        f"{model_config.num_experts} experts, over expert={expert})"
        if model_config.num_experts
        else ""
    )
    rows = [("parameters", param_bytes, f"{num_params:,} params{active}, {m.param_dtype}")]
    if lora:
        base_dtype = (
            m.param_dtype
            if cfg.lora.quantize == "none"
            else f"{cfg.lora.quantize} projections{' and experts' if model_config.num_experts else ''}, "
            f"{m.param_dtype} rest"
        )
        rows = [
            ("base (frozen)", frozen_bytes, f"{num_all - num_params:,} params{active}, {base_dtype}"),
            ("adapters", param_bytes, f"{num_params:,} LoRA params (rank {cfg.lora.rank}), {m.param_dtype}"),
        ]
    rows += [
        ("gradients", grad_bytes, "float32 accumulator"),
        ("optimizer", opt_bytes, "AdamW mu + nu (eval_shape of optax init)"),
    ]
    if cfg.dpo.reference == "online":
        note = (
            "online reference: the base with a copy of the adapters"
            if lora
            else "online reference: frozen copy"
        )
        rows.append(("reference params", param_bytes, note))
    rows += [
        ("activations", act_bytes, f"B={B} x T={T}{split}, {dtype.name}, {kernel} attention, {remat_note}"),
        ("log-prob chunk", chunk_bytes, f"chunk={chunk} x V={V} float32 (this device's rows as one group)"),
        ("batch", batch_bytes, f"A={cfg.train.grad_accum} x B x T x {BATCH_ARRAYS} int32/float32"),
    ]
    if context > 1:
        how = "ring" if kernel in RING_KERNELS else m.context_attention  # splash, pallas_gpu: the ring only
        kv = context_kv_bytes(
            model_config, how=how, rows=B, row_length=T, context=context, dtype_bytes=b, tensor=tensor
        )
        what = "the whole row's" if how in ("auto", "all_gather") else "two ring shards'"
        rows.append(("context k / v", kv, f"{how}: one layer's k / v, {what}, with f32 gradients"))
    if lora and cfg.lora.quantize != "none":  # each layer's kernels are dequantised as it runs
        layer, what = dequantised_layer_bytes(model_config, tensor=tensor, expert=expert, dtype_bytes=b)
        rows.append(("dequantised layer", layer, f"one layer's {what} in {dtype.name}"))
    ref_cache = (
        None if num_pairs is None or cfg.dpo.reference != "cached" else num_pairs * REF_CACHE_BYTES_PER_PAIR
    )
    host = B * Tl * host_offload_bytes_per_token(model_config, remat=remat, dtype_bytes=b)
    return MemoryPlan(rows, num_all, (data, fsdp, tensor), B, T, ref_cache, num_pairs, expert, context, host)


def longest_row(model_config, cfg, *, num_devices: int, device_bytes: int, backend: str | None = None,
                step: int = 1024, limit: int = 1 << 21) -> int:  # fmt: skip
    """The longest row length (a multiple of `step` and of 2 x mesh.context, up to `limit`) whose plan
    fits `device_bytes` (`fits`: within the headroom) with `cfg`'s other settings; 0 when none does.
    The plan grows with the row length, so a bisection finds it."""
    step = step * 2 * cfg.mesh.context // math.gcd(step, 2 * cfg.mesh.context)

    def ok(T: int) -> bool:
        at = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, row_length=T))
        on_cpu = backend == "cpu"
        plan = plan_memory(model_config, at, num_devices=num_devices, on_cpu=on_cpu, backend=backend)
        return fits(plan, device_bytes)

    lo, hi = 0, limit // step  # multiples of step: lo fits (or is 0), hi + 1 does not
    if ok(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid * step) else (lo, mid)
    return lo * step


def human(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    for unit, div in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def fits(plan: MemoryPlan, device_bytes: int) -> bool:
    """True when the plan uses at most HEADROOM of the device's memory."""
    return plan.total <= HEADROOM * device_bytes


def format_plan(plan: MemoryPlan, *, device: str, device_bytes: int) -> str:
    """The table `jdpo plan` prints, with the verdict against one device's memory."""
    d, f, t = plan.mesh
    c = plan.context
    x = f" expert={plan.expert}" if plan.expert > 1 else ""
    lines = [
        f"memory per device, mesh data={d} fsdp={f} tensor={t}{x} context={c} "
        f"({d * f * t * plan.expert * c} devices)",
        f"{'part':<18}{'per device':>14}  how",
        "-" * 78,
    ]
    lines += [f"{name:<18}{human(nbytes):>14}  {note}" for name, nbytes, note in plan.rows]
    lines.append("-" * 78)
    share = plan.total / device_bytes
    lines.append(f"{'total':<18}{human(plan.total):>14}  {share:.0%} of {device} ({human(device_bytes)})")
    if plan.host_bytes:
        lines.append(f"{'host (offload)':<18}{human(plan.host_bytes):>14}  pinned host memory: layer inputs")
    if plan.ref_cache_bytes is not None:
        lines.append(
            f"{'reference cache':<18}{human(plan.ref_cache_bytes):>14}  host/disk, {plan.num_pairs:,} pairs"
        )
    if fits(plan, device_bytes):
        lines.append(f"fits: yes ({human(device_bytes - plan.total)} left)")
    elif plan.total <= device_bytes:
        lines.append(f"fits: tight (above {HEADROOM:.0%}; XLA scratch and fragmentation need headroom)")
    else:
        lines.append("fits: NO; try model.remat=dots_saveable or full, fewer train.batch_rows with more "
                     "grad_accum, a shorter data.row_length, or more fsdp devices")  # fmt: skip
    return "\n".join(lines)


def count_pairs(sources, fmt: str = "auto") -> int | None:
    """Pairs in local train sources (None when any source is not a local path: no hub access here)."""
    srcs = list(sources)
    if not srcs or not all(Path(s.rsplit(":", 1)[0] if ":" in s and not Path(s).exists() else s).exists()
                           for s in srcs):  # fmt: skip
        return None

    return len(jdata.load_preferences(srcs, fmt))


def check_run_size(cfg, *, num_devices: int) -> None:
    """Before anything loads: refuse (ConfigError) a run whose `plan_memory` estimate exceeds one device's
    memory (`device_memory()`: the accelerator's limit, host RAM on CPU), naming both numbers and the
    settings to lower, and the model's positions when data.max_length is past them; warn when only the
    positions are exceeded (RoPE extrapolates past max_position_embeddings; the data may be shorter).
    Says nothing when model.path has no readable config.json or the mesh does not resolve: the trainer
    names those."""
    import jax

    try:
        model_config = read_model_config(cfg.model.path)
    except (OSError, ValueError):
        return
    d, positions = cfg.data, model_config.max_position_embeddings
    past = (
        f"data.max_length {d.max_length} is above the {positions} positions of the model "
        f"(max_position_embeddings in {cfg.model.path}/config.json)"
    )
    backend = jax.default_backend()
    try:
        plan = plan_memory(
            model_config, cfg, num_devices=num_devices, on_cpu=backend == "cpu", backend=backend
        )
    except ValueError:
        plan = None
    device, limit = device_memory()
    if plan is not None and plan.total > limit:
        raise ConfigError(
            f"jdpo plan estimates {human(plan.total)} per device for this run ({plan.rows_per_device} rows "
            f"of {plan.row_length} tokens per device), more than the {human(limit)} of {device}: lower "
            "data.max_length, data.row_length or train.batch_rows, or add devices (jdpo plan shows the "
            "breakdown)" + (f"; {past}" if d.max_length > positions else "")
        )
    if d.max_length > positions:
        log.warning("%s: sequences longer than that run on extrapolated positions; set data.max_length <= "
                    "%d unless the model is meant to", past, positions)  # fmt: skip
