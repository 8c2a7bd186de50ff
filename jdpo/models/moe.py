"""The mixture-of-experts MLP (qwen3_moe, mixtral, gpt_oss): a float32 top-k router and E gated experts as
stacked kernels, dispatched without computing every expert for every token.

Parameter layouts (x @ W convention, experts stacked on a leading [E] axis, logical name "expert"):
  router.kernel [D, E] (gpt_oss: router.bias [E])
  experts.gate_proj / experts.up_proj [E, D, F]   experts.down_proj [E, F, D]
  gpt_oss: experts.gate_up_proj [E, D, F, 2] (gate, up), gate_up_proj_bias [E, F, 2], down_proj_bias [E, D]
  LoRA on the experts (`lora.targets` experts.gate_up_proj / experts.down_proj, PEFT's target_parameters):
  one adapter per expert, as `nnx.LoRAParam`s beside the kernels: experts.gate_up_proj_lora_a [E, D, r]
  with _lora_b [E, r, 2, F] (gate, up: one A for both, as PEFT adapts transformers' fused gate_up_proj;
  gpt_oss [E, r, F, 2], its interleaved order), experts.down_proj_lora_a [E, F, r], _lora_b [E, r, D].
  They run inside the dispatch as two more stacked per-expert matmuls, (x A_e) B_e, never merged.
  QLoRA (`lora.quantize` int8 / nf4): the stacked kernels (not the biases) are stored as codes with
  float32 scales, experts.<name> and experts.<name>_scale (`jdpo.models.quantize`, each expert's [in, *out]
  kernel quantised like a projection's), and dequantised to the compute dtype inside the expert function,
  one layer at a time.

Dispatch (`ModelOptions.moe_dispatch`):
  "ragged" (default, dropless): the M x k (token, expert) assignments are sorted by expert, gathered into
  one [M k, D] array and run by `jax.lax.ragged_dot` (a grouped matmul: rows of group e times expert e's
  kernel), then unsorted and combined with the router's weights. No capacity, no dropped token; the cost
  is k experts per token.
  "dense": every expert on every token, combined with one-hot weights (E / k times the FLOPs; the
  reference the ragged path is tested against and the bench's baseline).
With a mesh whose "expert" axis is > 1 the experts are sharded over it (`jdpo.models.expert_parallel`).

The router also returns per-layer statistics of the real (non-padding) tokens, from which the
load-balancing loss and the expert load are computed (`jdpo.losses.router`).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jdpo.models import quantize as quantization
from jdpo.models.choices import EXPERT_TARGETS
from jdpo.models.config import ModelConfig
from jdpo.models.dispatch import DISPATCH, QUANTIZED_KERNELS, expert_mlp
from jdpo.models.expert_parallel import expert_axis_size, sharded_experts
from jdpo.models.layers import _param
from jdpo.models.options import ModelOptions


class Router(nnx.Module):
    """Top-k routing in float32: softmax over the E logits, the k largest, renormalised when asked."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        D, E = config.hidden_size, config.num_experts
        self.kernel = _param(
            rngs.params(), (D, E), ("embed", None), options.param_dtype, "normal", config.initializer_range
        )
        self.bias = (
            _param(None, (E,), (None,), options.param_dtype, "zeros", 0.0) if config.router_bias else None
        )
        self.k, self.normalise = config.experts_per_token, config.norm_topk_prob
        self.frozen = options.freeze_router

    def __call__(self, x_MxD):
        """(probabilities [M, E], chosen experts [M, k] int32, their weights [M, k]), all float32."""
        kernel_DxE = self.kernel[...].astype(jnp.float32)
        if self.frozen:  # model.freeze_router: no gradient reaches the router (the step leaves it as is)
            kernel_DxE = jax.lax.stop_gradient(kernel_DxE)
        logits_MxE = jnp.dot(x_MxD.astype(jnp.float32), kernel_DxE, precision=jax.lax.Precision.HIGHEST)
        if self.bias is not None:  # gpt_oss
            bias_E = self.bias[...].astype(jnp.float32)
            logits_MxE = logits_MxE + (jax.lax.stop_gradient(bias_E) if self.frozen else bias_E)
        probs_MxE = jax.nn.softmax(logits_MxE, axis=-1)
        weights_MxK, experts_MxK = jax.lax.top_k(probs_MxE, self.k)
        if self.normalise:
            weights_MxK = weights_MxK / jnp.sum(weights_MxK, axis=-1, keepdims=True)
        return probs_MxE, experts_MxK.astype(jnp.int32), weights_MxK


class Experts(nnx.Module):
    """E gated MLPs as stacked kernels."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        D, E, F = config.hidden_size, config.num_experts, config.moe_intermediate_size
        kw = dict(param_dtype=options.param_dtype, init="normal", std=config.initializer_range)
        if config.swiglu_limit is None:
            self.gate_proj = _param(rngs.params(), (E, D, F), ("expert", "embed", "mlp"), **kw)
            self.up_proj = _param(rngs.params(), (E, D, F), ("expert", "embed", "mlp"), **kw)
        else:  # gpt_oss: gate and up interleaved, biases
            self.gate_up_proj = _param(rngs.params(), (E, D, F, 2), ("expert", "embed", "mlp", None), **kw)
            zeros = dict(param_dtype=options.param_dtype, init="zeros", std=0.0)
            self.gate_up_proj_bias = _param(None, (E, F, 2), ("expert", "mlp", None), **zeros)
            self.down_proj_bias = _param(None, (E, D), ("expert", None), **zeros)
        self.down_proj = _param(rngs.params(), (E, F, D), ("expert", "mlp", "embed"), **kw)
        self.act, self.limit = config.hidden_act, config.swiglu_limit
        lora = options.lora
        # QLoRA (`lora.quantize`): the frozen stacked kernels as codes + float32 scales
        # (`jdpo.models.quantize`, one expert's [in, *out] kernel like a projection's, [E] its lead axis),
        # dequantised to the compute dtype inside the expert function (`dispatch.expert_mlp`), per layer.
        self.quantize = "none" if lora is None else lora.quantize
        if self.quantize != "none":
            for name in QUANTIZED_KERNELS:
                if (var := getattr(self, name, None)) is None:
                    continue
                names, value = var.get_metadata().get("out_sharding"), var.get_value()
                n_out = QUANTIZED_KERNELS[name]
                codes, scale = quantization.quantize(value, self.quantize, n_in=1, n_out=n_out)
                scale_names = (names[0], *names[2:]) if self.quantize == "int8" else names
                setattr(self, name, nnx.Param(codes, out_sharding=tuple(names), eager_sharding=False))
                setattr(self, f"{name}_scale", nnx.Param(
                    scale, out_sharding=tuple(scale_names), eager_sharding=False
                ))  # fmt: skip
        adapted = [t for t in EXPERT_TARGETS if lora is not None and t in lora.targets]
        self.lora_scale = lora.scale if adapted else None
        for target in adapted:
            name = target.split(".")[1]
            (n_in, in_axis), out = expert_adapter_shapes(config)[name]
            # PEFT's init per expert: A ~ U(+-1/sqrt(fan_in)), B = 0 (the adapted model starts as the base).
            bound = n_in**-0.5
            a = jax.random.uniform(rngs.params(), (E, n_in, lora.rank), jnp.float32, -bound, bound)
            setattr(self, f"{name}_lora_a", nnx.LoRAParam(
                a.astype(options.param_dtype), out_sharding=("expert", in_axis, None), eager_sharding=False
            ))  # fmt: skip
            setattr(self, f"{name}_lora_b", nnx.LoRAParam(
                jnp.zeros((E, lora.rank, *(n for n, _ in out)), options.param_dtype),
                out_sharding=("expert", None, *(axis for _, axis in out)), eager_sharding=False,
            ))  # fmt: skip

    @property
    def fn(self):
        """The expert function (`dispatch.expert_mlp` of this family, its adapters' scale and the kernels'
        quantisation bound)."""
        return functools.partial(
            expert_mlp, act=self.act, limit=self.limit, lora_scale=self.lora_scale, quantize=self.quantize
        )

    def kernels(self, dtype) -> dict:
        """The stacked kernels, biases and adapters (names ending in _lora_a / _lora_b) in `dtype`; a
        quantised kernel as stored (its codes, and its float32 scales under <name>_scale), dequantised by
        the expert function where it runs."""
        return {
            k: v[...] if self.quantize != "none" and (k in QUANTIZED_KERNELS or k.endswith("_scale"))
            else v[...].astype(dtype)
            for k, v in vars(self).items()
            if isinstance(v, nnx.Variable)
        }  # fmt: skip


def expert_adapter_shapes(config: ModelConfig) -> dict:
    """Per expert, ((in, its logical axis), ((out size, logical axis), ...)) of each adaptable expert
    projection: gate_up_proj's output is (2, F) (gate, up), gpt_oss's (F, 2) (interleaved)."""
    D, F = config.hidden_size, config.moe_intermediate_size
    gate_up = ((F, "mlp"), (2, None)) if config.swiglu_limit is not None else ((2, None), (F, "mlp"))
    return {"gate_up_proj": ((D, "embed"), gate_up), "down_proj": ((F, "mlp"), ((D, "embed"),))}


def router_stats(probs_MxE, experts_MxK, valid_M):
    """Sums over the real tokens of one layer: `counts` [E] (top-k assignments per expert), `probs` [E]
    (router probability per expert) and `tokens` [] (how many real tokens)."""
    v_M = valid_M.astype(jnp.float32)
    assigned_MxE = jnp.sum(jax.nn.one_hot(experts_MxK, probs_MxE.shape[-1], dtype=jnp.float32), axis=1)
    return {
        "counts": jnp.einsum("ME,M->E", assigned_MxE, v_M),
        "probs": jnp.einsum("ME,M->E", probs_MxE, v_M),
        "tokens": jnp.sum(v_M),
    }


class SparseMoE(nnx.Module):
    """The MoE block in place of a layer's MLP: `(y [B, T, D], router statistics)`."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        self.router = Router(config, options, rngs=rngs)
        self.experts = Experts(config, options, rngs=rngs)
        self.num_experts = config.num_experts
        self.dtype, self.dispatch = options.dtype, options.moe_dispatch

    def __call__(self, x_BxTxD, dropout_key=None, valid_BxT=None):
        """`valid_BxT`: the real tokens (segment id != 0), the ones the statistics count; None: all."""
        del dropout_key  # LoRA dropout applies to adapted Dense projections; the experts have none
        B, T, D = x_BxTxD.shape
        x_MxD = x_BxTxD.reshape(B * T, D)
        probs_MxE, experts_MxK, weights_MxK = self.router(x_MxD)
        kernels, fn = self.experts.kernels(self.dtype), self.experts.fn
        if expert_axis_size() > 1:
            y_MxD = sharded_experts(x_MxD, experts_MxK, weights_MxK, kernels, fn, self.num_experts)
        else:
            y_MxD = DISPATCH[self.dispatch](x_MxD, experts_MxK, weights_MxK, kernels, fn, self.num_experts)
        valid_M = jnp.ones((B * T,), bool) if valid_BxT is None else valid_BxT.reshape(-1) != 0
        return y_MxD.reshape(B, T, D).astype(self.dtype), router_stats(probs_MxE, experts_MxK, valid_M)
