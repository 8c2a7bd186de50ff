"""LoRA: low-rank adapters on the frozen base, the reference as the base with its initial adapters.

A LoRA run (`lora.rank > 0`) builds the decoder with `ModelOptions.lora`: every targeted projection
(`jdpo.models.layers.Dense`) computes y = x W + (alpha / r) x A B with A [*in, r] ~ U(+-1/sqrt(in))
and B [r, *out] = 0, both `nnx.LoRAParam`; an MoE model's experts named in the targets
(experts.gate_up_proj / experts.down_proj) hold one such pair per expert, [E, in, r] and [E, r, *out],
beside their stacked kernels (`jdpo.models.moe.Experts`). The model's state then splits in two:

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

This module is what a run calls (`model_options`, `split`); the adapter arithmetic is
`jdpo.models.adapters`, the PEFT directory format `jdpo.models.peft`.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jdpo.models.adapters import (
    adapter_spec,
    base_kernel,
    delta,
    dense_modules,
    merged,
    projection_shapes,
    zero_like,
)
from jdpo.models.config import ModelConfig
from jdpo.models.options import ModelOptions
from jdpo.models.peft import check_adapter, load_adapter
from jdpo.models.transformer import Transformer

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


def model_options(options: ModelOptions, section, model_path: str) -> ModelOptions:
    """`options` with the adapters of `section` (a run's `lora:` section: rank, alpha, targets, quantize,
    dropout, init_adapter; unchanged for full fine-tuning, rank 0). Checks the targets, the rank against
    every target's dimensions and the init adapter against the model (config.json only), so a mismatch
    is refused before the weights load."""
    if section.rank == 0:
        return options
    config = ModelConfig.from_hf(model_path)
    spec = adapter_spec(
        config, rank=section.rank, alpha=section.alpha, targets=section.targets, quantize=section.quantize,
        dropout=section.dropout, where=model_path,
    )  # fmt: skip
    if section.init_adapter:
        check_adapter(section.init_adapter, config, spec)
    return dataclasses.replace(options, lora=spec)


def split(model: Transformer, section):
    """(graphdef, trained params, frozen base): for full fine-tuning (params, None); for LoRA the
    adapters (from `section.init_adapter` when given) and the base."""
    if section.rank == 0:
        graphdef, params = nnx.split(model)
        return graphdef, params, None
    if section.init_adapter:
        load_adapter(model, section.init_adapter)
    return nnx.split(model, nnx.LoRAParam, ...)
