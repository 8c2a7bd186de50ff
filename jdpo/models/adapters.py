"""The LoRA adapters of a decoder as arrays: which projections a model has and their shapes, the adapter
spec a run asks for (checked against the model), the adapters' change to each kernel, and merging.

`jdpo.models.lora` (the run-facing entry points) and `jdpo.models.peft` (PEFT's directory format) both
build on this module; it imports neither of them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jdpo.errors import ConfigError
from jdpo.models import quantize as quantization
from jdpo.models.choices import EXPERT_TARGETS, FUSED_TARGETS, LORA_TARGETS
from jdpo.models.config import ModelConfig
from jdpo.models.dispatch import QUANTIZED_KERNELS
from jdpo.models.layers import Dense
from jdpo.models.moe import Experts, expert_adapter_shapes
from jdpo.models.options import PROJECTIONS, LoRASpec
from jdpo.models.transformer import Transformer

#: The block of the decoder layer each projection lives in (its HF module path is layers.{i}.<block>.<name>).
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "qkv_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp",
         "down_proj": "mlp"}  # fmt: skip


def projection_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """HF module name -> (input shape, output shape) of each projection the model has, in jdpo's kernel
    layout (phi3: the fused qkv_proj and gate_up_proj in place of their parts)."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    if c.fused_projections:
        return {
            "qkv_proj": ((D,), (N + 2 * K, H)),
            "o_proj": ((N, H), (D,)),
            "gate_up_proj": ((D,), (2, F)),
            "down_proj": ((F,), (D,)),
        }
    return {
        "q_proj": ((D,), (N, H)),
        "k_proj": ((D,), (K, H)),
        "v_proj": ((D,), (K, H)),
        "o_proj": ((N, H), (D,)),
        "gate_proj": ((D,), (F,)),
        "up_proj": ((D,), (F,)),
        "down_proj": ((F,), (D,)),
    }


def expert_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """An MoE model's expert projections (EXPERT_TARGETS) -> (input shape, output shape) of one expert's
    adapted projection in jdpo's layout ({} for a dense model)."""
    if not c.num_experts:
        return {}
    return {
        f"experts.{name}": ((n_in,), tuple(n for n, _ in out))
        for name, ((n_in, _), out) in expert_adapter_shapes(c).items()
    }


def model_targets(targets, config: ModelConfig, *, field: str = "lora.targets") -> tuple[str, ...]:
    """The model's projections that `targets` (HF module names) adapt, in PROJECTIONS order, then the
    experts' (EXPERT_TARGETS). A fused name on an unfused model stands for its parts; on a fused model
    (phi3) the parts stand for the fused projection when all of them are named (the fused module has one
    adapter: a part alone is refused)."""
    have = projection_shapes(config)
    if config.num_experts and tuple(targets) == LORA_TARGETS:
        # The default on an MoE model: the attention (its experts take adapters only when named, as
        # experts.gate_up_proj / experts.down_proj); the plain MLP names are refused below.
        targets = [name for name in LORA_TARGETS if BLOCK.get(name) == "self_attn"]
    out, experts = set(), set()
    for name in targets:
        if name in EXPERT_TARGETS:
            if not config.num_experts:
                raise ConfigError(
                    f"{field}: {name!r} adapts an MoE layer's experts, and {config.family} has none: name "
                    f"its projections ({', '.join(have)})"
                )
            experts.add(name)
            continue
        if config.num_experts and BLOCK.get(name) == "mlp":
            raise ConfigError(
                f"{field}: {name!r} on {config.family} is an MoE layer's experts' projection; adapt the "
                "experts by their stacked parameters (one adapter per expert, PEFT's target_parameters): "
                f"{field}: [q_proj, k_proj, v_proj, o_proj, experts.gate_up_proj, experts.down_proj] (gate "
                "and up share one adapter, as in transformers' fused gate_up_proj)"
            )
        if name in have:
            out.add(name)
        elif name in FUSED_TARGETS and not config.fused_projections:
            out.update(FUSED_TARGETS[name])
        elif fused := [f for f, parts in FUSED_TARGETS.items() if name in parts and f in have]:
            parts = FUSED_TARGETS[fused[0]]
            if not set(parts) <= set(targets):
                raise ConfigError(
                    f"{field}: {config.family} fuses {', '.join(parts)} into one {fused[0]}, which takes one "
                    f"adapter: name all of {', '.join(parts)} (or {fused[0]}), or none"
                )
            out.add(fused[0])
        else:
            raise ConfigError(f"{field}: {name!r} is not a projection of the model ({', '.join(have)})")
    return tuple(p for p in PROJECTIONS if p in out) + tuple(t for t in EXPERT_TARGETS if t in experts)


def adapter_spec(
    config: ModelConfig, *, rank: int, alpha: float, targets, quantize: str = "none", dropout: float = 0.0,
    where: str = "",
) -> LoRASpec:  # fmt: skip
    """The `LoRASpec` of adapters with these settings on the model of `config`: targets resolved to the
    model's projections (`model_targets`), the rank checked against every target's dimensions and nf4
    against the input axes it packs. `where` (the model's path) ends the error messages."""
    resolved = model_targets(targets, config)
    shapes = {**projection_shapes(config), **expert_shapes(config)}
    experts = [t for t in resolved if t in EXPERT_TARGETS]
    if experts and dropout:
        raise ConfigError(
            f"lora.dropout={dropout} with lora.targets {', '.join(experts)}: PEFT's adapters on the experts' "
            "stacked parameters (target_parameters) take no dropout; set lora.dropout: 0, or adapt the "
            "attention only"
        )
    for name in resolved:
        n_in, n_out = (math.prod(s) for s in shapes[name])
        if rank > min(n_in, n_out):
            raise ConfigError(
                f"lora.rank={rank} is larger than {name}'s dimensions ({n_in} in, {n_out} out) in {where}"
            )
    if quantize == "nf4":  # two 4-bit codes per byte along each projection's (and expert's) last input axis
        for name, (in_shape, _) in {**projection_shapes(config), **expert_shapes(config)}.items():
            if in_shape[-1] % 2:
                raise ConfigError(
                    f"lora.quantize=nf4 packs two weights per byte along {name}'s input axis, whose size "
                    f"{in_shape[-1]} in {where} is odd; use lora.quantize=int8"
                )
    return LoRASpec(
        rank=rank, alpha=float(alpha), targets=resolved, quantize=quantize, dropout=float(dropout)
    )


def zero_like(adapters):
    """Adapters that change nothing (all zeros, so A B = 0 exactly): the reference of a run without an
    init adapter is then exactly the base."""
    return jax.tree.map(jnp.zeros_like, adapters)


def dense_modules(model, *, adapted: bool = True) -> dict[tuple, nnx.Module]:
    """Path -> Dense of the adapted projections (adapted=False: every projection)."""
    return {
        path: m
        for path, m in nnx.iter_graph(model)
        if isinstance(m, Dense) and (m.lora_scale is not None or not adapted)
    }


def base_kernel(dense) -> jax.Array:
    """A projection's base kernel in float32 (a quantised one dequantised, `jdpo.models.quantize`)."""
    if dense.quantize == "none":
        return dense.kernel[...].astype(jnp.float32)
    return quantization.dequantize(
        dense.kernel[...], dense.kernel_scale[...], dense.quantize, n_in=dense.n_in, n_out=dense.n_out,
        dtype=jnp.float32,
    )  # fmt: skip


def expert_kernel(experts: Experts, name: str) -> jax.Array:
    """A stacked expert kernel of `experts` ([..., E, in, *out]) in float32 (a quantised one dequantised)."""
    value = getattr(experts, name)[...]
    if experts.quantize == "none":
        return value.astype(jnp.float32)
    scale, n_out = getattr(experts, f"{name}_scale")[...], QUANTIZED_KERNELS[name]
    return quantization.dequantize(value, scale, experts.quantize, n_in=1, n_out=n_out, dtype=jnp.float32)


def delta(dense) -> jax.Array:
    """The adapter's change to `dense`'s kernel, (alpha / r) A B, in float32 and the kernel's shape
    (stacked layers keep their leading [L] axis)."""
    a, b = dense.lora_a[...].astype(jnp.float32), dense.lora_b[...].astype(jnp.float32)
    r = a.shape[-1]
    lead = a.shape[: a.ndim - dense.n_in - 1]  # () or (L,)
    k_in = math.prod(a.shape[len(lead) : -1])
    ab = jnp.matmul(a.reshape(*lead, k_in, r), b.reshape(*lead, r, -1))
    return ab.reshape(*a.shape[:-1], *b.shape[b.ndim - dense.n_out :]) * dense.lora_scale


def expert_deltas(experts: Experts) -> dict[str, jax.Array]:
    """The per-expert adapters' change to each stacked expert kernel of `experts` (a `moe.Experts`):
    kernel name -> (alpha / r) A_e B_e in float32 and the kernel's shape (stacked layers keep [L])."""
    out = {}
    for target in EXPERT_TARGETS:
        name = target.split(".")[1]
        a_var = getattr(experts, f"{name}_lora_a", None)
        if a_var is None:
            continue
        a = a_var[...].astype(jnp.float32)  # [..., E, in, r]
        b = getattr(experts, f"{name}_lora_b")[...].astype(jnp.float32)  # [..., E, r, *out]
        lead = a.ndim - 2  # (L,) E or E
        ab = jnp.matmul(a, b.reshape(*b.shape[: lead + 1], -1)).reshape(*a.shape[:-1], *b.shape[lead + 1 :])
        ab = ab * experts.lora_scale
        if name == "gate_up_proj" and experts.limit is None:  # [..., E, D, 2, F] -> gate_proj, up_proj
            out["gate_proj"], out["up_proj"] = ab[..., 0, :], ab[..., 1, :]
        else:
            out[name] = ab
    return out


def merged(model: Transformer) -> Transformer:
    """The same function without adapters: every adapted kernel W + (alpha / r) A B (a quantised base
    dequantised first, the experts' too; a stacked expert kernel W_e + (alpha / r) A_e B_e per expert), in
    `param_dtype` and the kernel's sharding; every other parameter shared. What `final_merged/` exports."""
    options = dataclasses.replace(model.options, lora=None)
    plain = nnx.eval_shape(lambda: Transformer(model.config, options=options, rngs=nnx.Rngs(0)))
    projections = dense_modules(model, adapted=False)
    experts = {
        p: m
        for p, m in nnx.iter_graph(model)
        if isinstance(m, Experts) and (m.lora_scale is not None or m.quantize != "none")
    }
    deltas: dict[tuple, dict] = {}
    source = {path: v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    for path, var in nnx.iter_graph(plain):
        if not isinstance(var, nnx.Variable):
            continue
        value = source[path].get_value()
        dense = projections.get(path[:-1]) if path[-1] == "kernel" else None
        if dense is not None and (dense.lora_scale is not None or dense.quantize != "none"):
            kernel = base_kernel(dense)
            if dense.lora_scale is not None:
                kernel = kernel + delta(dense)
            value = jax.device_put(kernel.astype(var.get_value().dtype), value.sharding)
        elif path[:-1] in experts:
            if path[:-1] not in deltas:
                deltas[path[:-1]] = expert_deltas(experts[path[:-1]])
            module = experts[path[:-1]]
            d = deltas[path[:-1]].get(path[-1])
            quantized = module.quantize != "none" and path[-1] in QUANTIZED_KERNELS
            if d is not None or quantized:
                kernel = expert_kernel(module, path[-1]) if quantized else value.astype(jnp.float32)
                kernel = kernel if d is None else kernel + d
                value = jax.device_put(kernel.astype(var.get_value().dtype), value.sharding)
        var.set_value(value)
    return plain
