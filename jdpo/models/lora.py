"""LoRA: low-rank adapters on the frozen base, the reference as the base with its initial adapters.

A LoRA run (`lora.rank > 0`) builds the decoder with `ModelOptions.lora`: every targeted projection
(`jdpo.models.transformer.Dense`) computes y = x W + (alpha / r) x A B with A [*in, r] ~ U(+-1/sqrt(in))
and B [r, *out] = 0, both `nnx.LoRAParam`. The model's state then splits in two:

    graphdef, adapters, base = lora.split(model, config.lora)   # nnx.split(model, nnx.LoRAParam, ...)

The adapters are the train state's "params" (the only thing with gradients and AdamW state, and what a
checkpoint holds); the base is the state's "base", passed through the step unchanged and never saved.
The reference is the base with the initial adapters: zeros (so exactly the base) or `lora.init_adapter`'s,
held as the state's "ref_params" with `dpo.reference: online`, a copy of the adapters only.

The adapters are plain NNX variables rather than qwix's `LoraProvider` (which adds them by intercepting
the model's dot_general / einsum calls at trace time) or flax's `nnx.LoRA` (a 2-D in x out wrapper that
calls its base module as `base(x)`): jdpo's projections keep per-head kernels ([D, N, H], [N, H, D]) that
are born sharded from logical axis names and stacked under `scan_layers`, and adapters declared next to
the kernel get all three for free (A sharded like the kernel's input axes, B like its output axes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jdpo.config import ConfigError, LoRASection
from jdpo.models import quantize as quantization
from jdpo.models.transformer import LoRASpec, ModelConfig, ModelOptions, Transformer

__all__ = [
    "base_kernel",
    "delta",
    "dense_modules",
    "merged",
    "model_options",
    "projection_shapes",
    "split",
    "zero_like",
]


def projection_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """HF module name -> (input shape, output shape) of that projection in jdpo's kernel layout."""
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return {
        "q_proj": ((D,), (N, H)),
        "k_proj": ((D,), (K, H)),
        "v_proj": ((D,), (K, H)),
        "o_proj": ((N, H), (D,)),
        "gate_proj": ((D,), (F,)),
        "up_proj": ((D,), (F,)),
        "down_proj": ((F,), (D,)),
    }


def model_options(options: ModelOptions, section: LoRASection, model_path: str) -> ModelOptions:
    """`options` with the adapters of `section` (unchanged for full fine-tuning). Checks the rank
    against every target's dimensions and the init adapter against the model (config.json only), so a
    mismatch is refused before the weights load."""
    if section.rank == 0:
        return options
    config = ModelConfig.from_hf(model_path)
    for name, (in_shape, out_shape) in projection_shapes(config).items():
        if name in section.targets and section.rank > min(math.prod(in_shape), math.prod(out_shape)):
            raise ConfigError(
                f"lora.rank={section.rank} is larger than {name}'s dimensions "
                f"({math.prod(in_shape)} in, {math.prod(out_shape)} out) in {model_path}"
            )
    if section.quantize == "nf4":  # two 4-bit codes per byte along each projection's last input axis
        for name, (in_shape, _) in projection_shapes(config).items():
            if in_shape[-1] % 2:
                raise ConfigError(
                    f"lora.quantize=nf4 packs two weights per byte along {name}'s input axis, whose size "
                    f"{in_shape[-1]} in {model_path} is odd; use lora.quantize=int8"
                )
    if section.init_adapter:
        from jdpo.models.peft import check_adapter

        check_adapter(section.init_adapter, config, section)
    spec = LoRASpec(
        rank=section.rank,
        alpha=float(section.alpha),
        targets=tuple(section.targets),
        quantize=section.quantize,
        dropout=float(section.dropout),
    )
    return dataclasses.replace(options, lora=spec)


def split(model: Transformer, section: LoRASection):
    """(graphdef, trained params, frozen base): for full fine-tuning (params, None); for LoRA the
    adapters (from `lora.init_adapter` when given) and the base."""
    if section.rank == 0:
        graphdef, params = nnx.split(model)
        return graphdef, params, None
    if section.init_adapter:
        from jdpo.models.peft import load_adapter

        load_adapter(model, section.init_adapter)
    return nnx.split(model, nnx.LoRAParam, ...)


def zero_like(adapters):
    """Adapters that change nothing (all zeros, so A B = 0 exactly): the reference of a run without an
    init adapter is then exactly the base."""
    return jax.tree.map(jnp.zeros_like, adapters)


def dense_modules(model, *, adapted: bool = True) -> dict[tuple, nnx.Module]:
    """Path -> Dense of the adapted projections (adapted=False: every projection)."""
    from jdpo.models.transformer import Dense

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


def delta(dense) -> jax.Array:
    """The adapter's change to `dense`'s kernel, (alpha / r) A B, in float32 and the kernel's shape
    (stacked layers keep their leading [L] axis)."""
    a, b = dense.lora_a[...].astype(jnp.float32), dense.lora_b[...].astype(jnp.float32)
    r = a.shape[-1]
    lead = a.shape[: a.ndim - dense.n_in - 1]  # () or (L,)
    k_in = math.prod(a.shape[len(lead) : -1])
    ab = jnp.matmul(a.reshape(*lead, k_in, r), b.reshape(*lead, r, -1))
    return ab.reshape(*a.shape[:-1], *b.shape[b.ndim - dense.n_out :]) * dense.lora_scale


def merged(model: Transformer) -> Transformer:
    """The same function without adapters: every adapted kernel W + (alpha / r) A B (a quantised base
    dequantised first), in `param_dtype` and the kernel's sharding; every other parameter shared. What
    `final_merged/` exports."""
    options = dataclasses.replace(model.options, lora=None)
    plain = nnx.eval_shape(lambda: Transformer(model.config, options=options, rngs=nnx.Rngs(0)))
    projections = dense_modules(model, adapted=False)
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
        var.set_value(value)
    return plain
