"""The layers of the one decoder: RMSNorm, projections (with LoRA / quantised bases), grouped-query
attention, the gated MLP and the decoder block. Family differences are `ModelConfig` switches read here.

Parameter layouts (x @ W convention, per-head shapes so heads can be sharded without reshapes):
  embed_tokens.embedding [V, D]   q_proj.kernel [D, N, H]   k_proj/v_proj.kernel [D, K, H]
  o_proj.kernel [N, H, D]         gate_proj/up_proj.kernel [D, F]   down_proj.kernel [F, D]
  phi3's fused qkv_proj.kernel [D, N + 2K, H] (q, k, v heads in that order), gate_up_proj.kernel [D, 2, F]
Attribute names mirror the Hugging Face modules (`q_proj`, `input_layernorm`, ...) so the weight tables in
`jdpo.models.families` stay short.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jdpo.models import quantize as quantization
from jdpo.models.attention import blocked_attention
from jdpo.models.config import ModelConfig
from jdpo.models.context_attention import context_attention
from jdpo.models.masks import AttentionMask
from jdpo.models.options import REMAT_POLICIES, ModelOptions
from jdpo.models.pallas_gpu import pallas_gpu_attention
from jdpo.models.rope import apply_rope
from jdpo.models.splash import splash_attention
from jdpo.parallel.context_layout import splits
from jdpo.parallel.sharding import constrain


def _param(key, shape, names, param_dtype, init: str, std: float):
    """A Param carrying logical axis names; placement is decided later by jdpo.parallel.sharding."""
    if init == "normal":
        value = (std * jax.random.normal(key, shape, jnp.float32)).astype(param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, param_dtype)
    else:
        value = jnp.ones(shape, param_dtype)
    # eager_sharding=False: shardings come from our own rules table (with divisibility fallback).
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + w), computed in float32 and cast to the compute dtype."""

    def __init__(self, dim: int, *, eps: float, offset: float, dtype, param_dtype, names=("norm",)):
        # gemma stores w with the +1 factored out, so its identity init is zeros.
        self.weight = _param(None, (dim,), names, param_dtype, "zeros" if offset else "ones", 0.0)
        self.eps, self.offset, self.dtype = eps, offset, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (self.weight[...].astype(jnp.float32) + self.offset)).astype(self.dtype)


class Dense(nnx.Module):
    """A kernel [*in, *out] (per-head shapes allowed) with an optional bias [*out]."""

    def __init__(
        self, key, in_shape, out_shape, names, *, bias: bool, param_dtype, std, bias_names=None, lora=None,
        quantize: str = "none",
    ):  # fmt: skip
        self.n_in, self.n_out = len(in_shape), len(out_shape)
        self.kernel = _param(key, (*in_shape, *out_shape), names, param_dtype, "normal", std)
        self.quantize = quantize
        if quantize != "none":  # codes + float32 scales (`jdpo.models.quantize`), dequantised in the matmul
            codes, scale = quantization.quantize(self.kernel[...], quantize, n_in=self.n_in, n_out=self.n_out)
            scale_names = names[self.n_in :] if quantize == "int8" else names
            self.kernel = nnx.Param(codes, out_sharding=tuple(names), eager_sharding=False)
            self.kernel_scale = nnx.Param(scale, out_sharding=tuple(scale_names), eager_sharding=False)
        if bias:
            self.bias = _param(None, out_shape, bias_names or names[self.n_in :], param_dtype, "zeros", 0.0)
        else:
            self.bias = None
        self.lora_scale = None if lora is None else lora.scale
        self.lora_dropout, self.lora_site = (0.0, 0) if lora is None else (lora.dropout, lora.site)
        if lora is not None:
            # A is sharded like the kernel's input axes, B like its output axes; the rank axis replicated.
            # PEFT's init: A ~ U(+-1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)), B = 0, so the adapted
            # model starts equal to the base.
            fan_in = math.prod(in_shape)
            a = jax.random.uniform(
                jax.random.fold_in(key, 1),
                (*in_shape, lora.rank),
                jnp.float32,
                -(fan_in**-0.5),
                fan_in**-0.5,
            )
            self.lora_a = nnx.LoRAParam(
                a.astype(param_dtype), out_sharding=(*names[: self.n_in], None), eager_sharding=False
            )
            self.lora_b = nnx.LoRAParam(
                jnp.zeros((lora.rank, *out_shape), param_dtype),
                out_sharding=(None, *names[self.n_in :]),
                eager_sharding=False,
            )

    def __call__(self, x, dtype, dropout_key=None):
        """x [*lead, *in] -> [*lead, *out] in `dtype`. `dropout_key` (a training forward): the adapter's
        input is dropped out at `lora_dropout` (inverted dropout, as PEFT); the base path never is."""
        if self.quantize == "none":
            kernel = self.kernel[...].astype(dtype)
        else:  # dequantised here, fused into the matmul's operand
            kernel = quantization.dequantize(
                self.kernel[...], self.kernel_scale[...], self.quantize, n_in=self.n_in, n_out=self.n_out,
                dtype=dtype,
            )  # fmt: skip
        lead, out_shape = x.shape[: x.ndim - self.n_in], kernel.shape[self.n_in :]
        k_in = math.prod(kernel.shape[: self.n_in])
        # As one 2-D matmul [tokens, in] x [in, out]: with the token axes merged, XLA:CPU computes the
        # backward's weight gradient without transposed copies of the activations (gated MLP fwd+bwd at
        # [4096, 512] x [512, 1408]: 290 ms -> 190 ms). The reshapes are free (row-major, axes adjacent).
        x_MxI = x.reshape(-1, k_in)
        y = jnp.dot(x_MxI, kernel.reshape(k_in, -1))
        if self.lora_scale is not None:
            a_IxR = self.lora_a[...].astype(dtype).reshape(k_in, -1)
            b_RxO = self.lora_b[...].astype(dtype).reshape(a_IxR.shape[1], -1)
            xa_MxI = x_MxI
            if dropout_key is not None and self.lora_dropout > 0:
                keep = 1.0 - self.lora_dropout
                kept_MxI = jax.random.bernoulli(
                    jax.random.fold_in(dropout_key, self.lora_site), keep, x_MxI.shape
                )
                xa_MxI = jnp.where(kept_MxI, x_MxI / jnp.asarray(keep, dtype), jnp.zeros((), dtype))
            y = y + jnp.dot(jnp.dot(xa_MxI, a_IxR), b_RxO) * jnp.asarray(self.lora_scale, dtype)
        y = y.reshape(*lead, *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embedding(nnx.Module):
    """Token embedding table [V, D]; also the unembedding when embeddings are tied."""

    def __init__(self, config: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        shape = (config.vocab_size, config.hidden_size)
        self.embedding = _param(
            rngs.params(), shape, ("vocab", "embed"), param_dtype, "normal", config.initializer_range
        )


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k bias, q/k norm, sliding window and logit soft-capping."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        c, param_dtype = config, options.param_dtype
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        kw = dict(param_dtype=param_dtype, std=c.initializer_range)
        lora = options.lora.for_module if options.lora is not None else (lambda name: None)
        kw["quantize"] = options.lora.quantize if options.lora is not None else "none"
        if c.fused_projections:  # phi3: one [D, N + 2K, H] kernel, split into q, k, v by head
            self.qkv_proj = Dense(
                rngs.params(), (D,), (N + 2 * K, H), ("embed", "heads", "head_dim"), bias=False,
                lora=lora("qkv_proj"), **kw,
            )  # fmt: skip
        else:
            self.q_proj = Dense(
                rngs.params(), (D,), (N, H), ("embed", "heads", "head_dim"), bias=c.qkv_bias,
                lora=lora("q_proj"), **kw,
            )  # fmt: skip
            self.k_proj = Dense(
                rngs.params(), (D,), (K, H), ("embed", "kv_heads", "head_dim"), bias=c.qkv_bias,
                lora=lora("k_proj"), **kw,
            )  # fmt: skip
            self.v_proj = Dense(
                rngs.params(), (D,), (K, H), ("embed", "kv_heads", "head_dim"), bias=c.qkv_bias,
                lora=lora("v_proj"), **kw,
            )  # fmt: skip
        self.o_proj = Dense(
            rngs.params(), (N, H), (D,), ("heads", "head_dim", "embed"), bias=c.o_bias,
            bias_names=("norm",), lora=lora("o_proj"), **kw,
        )  # fmt: skip
        if c.qk_norm:
            norm_kw = dict(
                eps=c.rms_norm_eps, offset=c.norm_offset, dtype=options.dtype, param_dtype=param_dtype
            )
            if c.qk_norm_scope == "projection":  # olmo2/3: one norm over all heads' features
                self.q_norm = RMSNorm(N * H, names=("norm",), **norm_kw)
                self.k_norm = RMSNorm(K * H, names=("norm",), **norm_kw)
            else:
                self.q_norm = RMSNorm(H, names=("head_dim",), **norm_kw)
                self.k_norm = RMSNorm(H, names=("head_dim",), **norm_kw)
        if c.attention_sinks:  # gpt_oss: a learned logit per head that every query's softmax also weighs
            self.sinks = _param(None, (N,), ("heads",), param_dtype, "zeros", 0.0)
        self.config, self.dtype = c, options.dtype
        self.attention, self.attention_block = options.attention, options.attention_block
        self.context_attention = options.context_attention

    def _qkv(self, x_BxTxD, cos, sin, dropout_key=None):
        """q [B, T, N, H], k and v [B, T, K, H] of new tokens (q/k norm and RoPE applied)."""
        c = self.config
        N, K = c.num_heads, c.num_kv_heads
        if c.fused_projections:
            qkv_BxTxMxH = self.qkv_proj(x_BxTxD, self.dtype, dropout_key)  # M = N + 2K heads
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = jnp.split(qkv_BxTxMxH, [N, N + K], axis=2)
        else:
            q_BxTxNxH = self.q_proj(x_BxTxD, self.dtype, dropout_key)
            k_BxTxKxH = self.k_proj(x_BxTxD, self.dtype, dropout_key)
            v_BxTxKxH = self.v_proj(x_BxTxD, self.dtype, dropout_key)
        if c.qk_norm and c.qk_norm_scope == "projection":
            q_BxTxNxH = self.q_norm(q_BxTxNxH.reshape(*q_BxTxNxH.shape[:2], -1)).reshape(q_BxTxNxH.shape)
            k_BxTxKxH = self.k_norm(k_BxTxKxH.reshape(*k_BxTxKxH.shape[:2], -1)).reshape(k_BxTxKxH.shape)
        elif c.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, cos, sin), ("batch", "length", "act_heads", None))
        k_BxTxKxH = constrain(apply_rope(k_BxTxKxH, cos, sin), ("batch", "length", "act_kv_heads", None))
        v_BxTxKxH = constrain(v_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        return q_BxTxNxH, k_BxTxKxH, v_BxTxKxH

    def _attend(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask: AttentionMask, dropout_key=None):
        """Attention of T queries over S keys (S == T without a cache), then the output projection.
        The segment-aware kernels (blocked, splash, pallas_gpu) read `mask` as segment ids and a window
        (self-attention only); the dense paths (xla, the KV cache) materialise it here as a boolean
        [B, 1, T, S] array."""
        c = self.config
        kernel, block = self.attention, self.attention_block
        segment_aware = dict(scale=c.attention_scale, block=block)
        split = mask.self_attention and splits(q_BxTxNxH.shape[1]) > 1  # rows split over the context axis
        if mask.slots_BxT is not None and not split:
            raise ValueError("rows dealt over the context axis in blocks reach a model on a mesh without it")
        if split:
            out_BxTxNxH = context_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, softcap=c.attn_logit_softcapping,
                how=self.context_attention, kernel=kernel, sliding_window=c.sliding_window, **segment_aware,
            )  # fmt: skip
        elif mask.self_attention and kernel == "blocked":
            out_BxTxNxH = blocked_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, softcap=c.attn_logit_softcapping, **segment_aware
            )
        elif mask.self_attention and kernel == "splash":
            out_BxTxNxH = splash_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask,
                softcap=c.attn_logit_softcapping, sliding_window=c.sliding_window, **segment_aware,
            )  # fmt: skip
        elif mask.self_attention and kernel == "pallas_gpu":  # no soft-cap: refused when the model is built
            out_BxTxNxH = pallas_gpu_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, sliding_window=c.sliding_window, **segment_aware
            )
        elif c.attention_sinks:  # xla only (`kernels.unsupported`), and the KV cache
            out_BxTxNxH = _sink_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask.dense(), c.attention_scale, self.sinks[...]
            )
        elif c.attn_logit_softcapping is None:
            out_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH,
                k_BxSxKxH,
                v_BxSxKxH,
                mask=mask.dense(),
                scale=c.attention_scale,
                implementation="xla",
            )
        else:
            out_BxTxNxH = _softcapped_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask.dense(), c.attention_scale, c.attn_logit_softcapping
            )
        return self.o_proj(out_BxTxNxH, self.dtype, dropout_key)

    def __call__(self, x_BxTxD, cos, sin, mask: AttentionMask, dropout_key=None):
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self._qkv(x_BxTxD, cos, sin, dropout_key)
        return self._attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask, dropout_key)

    def extend(self, x_BxTxD, cos, sin, mask: AttentionMask, k_BxSxKxH, v_BxSxKxH, slot):
        """T new tokens written at cache slots [slot, slot + T) of this layer's cache, then attended over
        all S slots (the mask hides unwritten slots and padding). Returns (out [B, T, D], new k, new v
        [B, T, K, H]); the caller stores the new k / v in its (possibly layer-stacked) cache."""
        q_BxTxNxH, k_new, v_new = self._qkv(x_BxTxD, cos, sin)
        k_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(
            k_BxSxKxH, k_new.astype(k_BxSxKxH.dtype), slot, axis=1
        )
        v_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(
            v_BxSxKxH, v_new.astype(v_BxSxKxH.dtype), slot, axis=1
        )
        out_BxTxD = self._attend(q_BxTxNxH, k_BxSxKxH.astype(self.dtype), v_BxSxKxH.astype(self.dtype), mask)
        return out_BxTxD, k_new, v_new


def _softcapped_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, cap):
    """Explicit attention with tanh soft-capped scores (dot_product_attention has no soft-cap)."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    scores = jnp.tanh(scores * scale / cap) * cap
    scores = jnp.where(mask_Bx1xTxS[:, :, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BxSxKxH)
    return out.reshape(B, T, N, H)


def _sink_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, sinks_N):
    """Attention whose softmax also weighs a per-head sink logit (gpt_oss): p = exp(s) / (sum exp(s) +
    exp(sink)); the sink holds no value, so a query's weights sum to less than 1."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_Bx1xTxS[:, :, None], scores * scale, -0.7 * jnp.finfo(jnp.float32).max)
    sink_KxG = sinks_N.astype(jnp.float32).reshape(K, N // K)
    sink_BxKxGxTx1 = jnp.broadcast_to(sink_KxG[None, :, :, None, None], (*scores.shape[:-1], 1))
    probs = jax.nn.softmax(jnp.concatenate([scores, sink_BxKxGxTx1], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_BxSxKxH.dtype), v_BxSxKxH)
    return out.reshape(B, T, N, H)


#: The residual stream entering a decoder layer (`checkpoint_name`): `remat: offload` saves it, and only
#: it, in pinned host memory (JAX's offload checkpoint policy), for rows whose activations do not fit
#: the device even split over the context axis; the layer is recomputed from it in the backward.
LAYER_INPUT = "decoder_layer_input"
OFFLOAD_POLICY = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[],
    names_which_can_be_offloaded=[LAYER_INPUT],
    offload_src="device",
    offload_dst="pinned_host",
)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); phi3 keeps gate and up as one [D, 2, F] kernel."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        D, F = config.hidden_size, config.intermediate_size
        kw = dict(bias=False, param_dtype=options.param_dtype, std=config.initializer_range)
        lora = options.lora.for_module if options.lora is not None else (lambda name: None)
        kw["quantize"] = options.lora.quantize if options.lora is not None else "none"
        if config.fused_projections:
            self.gate_up_proj = Dense(
                rngs.params(), (D,), (2, F), ("embed", None, "mlp"), lora=lora("gate_up_proj"), **kw
            )
        else:
            self.gate_proj = Dense(rngs.params(), (D,), (F,), ("embed", "mlp"), lora=lora("gate_proj"), **kw)
            self.up_proj = Dense(rngs.params(), (D,), (F,), ("embed", "mlp"), lora=lora("up_proj"), **kw)
        self.down_proj = Dense(rngs.params(), (F,), (D,), ("mlp", "embed"), lora=lora("down_proj"), **kw)
        self.act, self.dtype, self.fused = config.hidden_act, options.dtype, config.fused_projections

    def __call__(self, x_BxTxD, dropout_key=None):
        if self.fused:
            gate_up_BxTx2xF = self.gate_up_proj(x_BxTxD, self.dtype, dropout_key)
            gate_BxTxF, up_BxTxF = gate_up_BxTx2xF[..., 0, :], gate_up_BxTx2xF[..., 1, :]
        else:
            gate_BxTxF = self.gate_proj(x_BxTxD, self.dtype, dropout_key)
            up_BxTxF = self.up_proj(x_BxTxD, self.dtype, dropout_key)
        if self.act == "silu":
            gate_BxTxF = jax.nn.silu(gate_BxTxF)
        else:  # gelu_pytorch_tanh (checked at config load)
            gate_BxTxF = jax.nn.gelu(gate_BxTxF, approximate=True)
        h_BxTxF = constrain(gate_BxTxF * up_BxTxF, ("batch", "length", "act_mlp"))
        return self.down_proj(h_BxTxF, self.dtype, dropout_key)


class DecoderLayer(nnx.Module):
    """Pre-norm block; gemma2/3 add norms on the attention and MLP outputs ("sandwich"); olmo2/3 have only
    those ("post-norm": the residual stream's inputs to attention and MLP are not normalised)."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs, mlp=None):
        """`mlp`: the layer's MLP when it is not the gated MLP (an MoE block, `jdpo.models.moe`)."""
        c = config

        def norm():
            return RMSNorm(
                c.hidden_size,
                eps=c.rms_norm_eps,
                offset=c.norm_offset,
                dtype=options.dtype,
                param_dtype=options.param_dtype,
            )

        if not c.post_norm:
            self.input_layernorm = norm()
        self.self_attn = Attention(c, options, rngs=rngs)
        # llama naming: post_attention_layernorm is the pre-MLP norm; gemma2/3, olmo2/3: it normalises the
        # attention output.
        self.post_attention_layernorm = norm()
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
        if c.sandwich_norm or c.post_norm:
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(c, options, rngs=rngs) if mlp is None else mlp
        self.sandwich, self.post_norm, self.moe = c.sandwich_norm, c.post_norm, mlp is not None

    def _attention_input(self, x_BxTxD):
        return x_BxTxD if self.post_norm else self.input_layernorm(x_BxTxD)

    def __call__(self, x_BxTxD, cos, sin, mask: AttentionMask, dropout_key=None):
        """(x [B, T, D], the MoE router's statistics of the real tokens or None for a gated MLP)."""
        x_BxTxD = checkpoint_name(x_BxTxD, LAYER_INPUT)  # what `remat: offload` keeps, on the host
        attn_BxTxD = self.self_attn(self._attention_input(x_BxTxD), cos, sin, mask, dropout_key)
        return self._finish(x_BxTxD, attn_BxTxD, dropout_key, mask.segment_ids_BxT)

    def extend(self, x_BxTxD, cos, sin, mask: AttentionMask, k_BxSxKxH, v_BxSxKxH, slot):
        """The layer on T new tokens with a KV cache (see `Attention.extend`): (x, new k, new v)."""
        attn_BxTxD, k_new, v_new = self.self_attn.extend(
            self._attention_input(x_BxTxD), cos, sin, mask, k_BxSxKxH, v_BxSxKxH, slot
        )
        return self._finish(x_BxTxD, attn_BxTxD, None, mask.segment_ids_BxT)[0], k_new, v_new

    def _mlp(self, x_BxTxD, dropout_key, segment_ids_BxT):
        if self.moe:
            return self.mlp(x_BxTxD, dropout_key, segment_ids_BxT)
        return self.mlp(x_BxTxD, dropout_key), None

    def _finish(self, x_BxTxD, attn_BxTxD, dropout_key, segment_ids_BxT):
        """Residual adds and the MLP after attention: (x, router statistics or None)."""
        if self.sandwich:
            x_BxTxD = x_BxTxD + self.post_attention_layernorm(attn_BxTxD)
            mlp_BxTxD, stats = self._mlp(
                self.pre_feedforward_layernorm(x_BxTxD), dropout_key, segment_ids_BxT
            )
            mlp_BxTxD = self.post_feedforward_layernorm(mlp_BxTxD)
        elif self.post_norm:
            x_BxTxD = x_BxTxD + self.post_attention_layernorm(attn_BxTxD)
            mlp_BxTxD, stats = self._mlp(x_BxTxD, dropout_key, segment_ids_BxT)
            mlp_BxTxD = self.post_feedforward_layernorm(mlp_BxTxD)
        else:
            x_BxTxD = x_BxTxD + attn_BxTxD
            mlp_BxTxD, stats = self._mlp(self.post_attention_layernorm(x_BxTxD), dropout_key, segment_ids_BxT)
        return constrain(x_BxTxD + mlp_BxTxD, ("batch", "length", "act_embed")), stats


def remat(fn, policy: str):
    """`fn` under the activation-saving policy `policy` (REMAT_POLICIES)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "dots_saveable":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if policy == "offload":  # the layer's input in pinned host memory, everything else recomputed
        return jax.checkpoint(fn, policy=OFFLOAD_POLICY)
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {policy!r}")
