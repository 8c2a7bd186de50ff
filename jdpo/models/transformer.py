"""The one NNX decoder shared by every family: RMSNorm, RoPE, grouped-query attention, gated MLP.

Family differences are config switches (see `ModelConfig`), never subclasses. Attribute names mirror the
Hugging Face modules (`q_proj`, `input_layernorm`, ...) so the weight tables in `families.py` stay short.

Parameter layouts (x @ W convention, per-head shapes so heads can be sharded without reshapes):
  embed_tokens.embedding [V, D]   q_proj.kernel [D, N, H]   k_proj/v_proj.kernel [D, K, H]
  o_proj.kernel [N, H, D]         gate_proj/up_proj.kernel [D, F]   down_proj.kernel [F, D]
  lm_head.kernel [D, V] (untied only; tied models reuse the embedding matrix transposed)
With `ModelOptions.scan_layers` the layer parameters are stacked with a leading [L] axis ("layers").

Which keys a query sees is `jdpo.models.masks.AttentionMask`, built once per forward and handed to every
layer; each attention call reads it in the form its kernel needs.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpo.config import ConfigError, attention_block_problem
from jdpo.models import quantize as quantization
from jdpo.models.attention import blocked_attention
from jdpo.models.kernels import ATTENTION_CHOICES, default_block, resolve_attention
from jdpo.models.masks import AttentionMask
from jdpo.models.pallas_gpu import pallas_gpu_attention
from jdpo.models.splash import splash_attention
from jdpo.parallel.sharding import constrain

REMAT_POLICIES = ("none", "full", "dots_saveable")
# Attention without a KV cache: `model.attention`, one of `jdpo.models.kernels.ATTENTION_CHOICES` (auto,
# blocked, splash, pallas_gpu, xla); `kernels.resolve_attention` decides what "auto" runs. The KV-cache
# path (`extend`: generation) always takes the dense mask.
ATTENTION_IMPLS = ATTENTION_CHOICES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder; built from a Hugging Face config.json by `from_hf`."""

    family: str  # llama | mistral | qwen2 | qwen3 | gemma | gemma2
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N query heads
    num_kv_heads: int  # K key/value heads (K == N: multi-head, K < N: grouped-query)
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    qkv_bias: bool = False  # qwen2; llama with attention_bias
    o_bias: bool = False  # llama with attention_bias
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
    norm_offset: float = 0.0  # gemma: norms scale by (1 + w)
    scale_embeddings: bool = False  # gemma: embeddings * sqrt(D), in compute dtype
    sandwich_norm: bool = False  # gemma2: post-attention, pre/post-feedforward norms
    sliding_window: int | None = None  # a key j is visible from query i when i - j < sliding_window
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () = all full
    attn_logit_softcapping: float | None = None  # gemma2
    final_logit_softcapping: float | None = None  # gemma2; also passed to the chunked log-prob path
    query_pre_attn_scalar: float | None = None  # gemma2: scores scale by query_pre_attn_scalar**-0.5
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    @classmethod
    def from_hf(cls, config_or_path) -> "ModelConfig":
        """From a HF config dict, a config.json path, or a checkpoint directory. Errors name the field."""
        from jdpo.models.families import config_from_hf

        return config_from_hf(config_or_path)

    def to_hf(self) -> dict:
        """A config.json dict that `transformers.AutoConfig` reads back to the same architecture."""
        from jdpo.models.families import config_to_hf

        return config_to_hf(self)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if not self.layer_types:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" and self.sliding_window is not None for t in self.layer_types)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        """Parameter count without building anything (for MFU accounting)."""
        D, F, N, K, H, V, L = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.num_layers,
        )
        attn = D * N * H * 2 + D * K * H * 2 + (N + 2 * K) * H * self.qkv_bias + D * self.o_bias
        norms = D * (4 if self.sandwich_norm else 2) + 2 * H * self.qk_norm
        return V * D * (1 if self.tie_word_embeddings else 2) + D + L * (attn + 3 * D * F + norms)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run a decoder, as opposed to what it is (`ModelConfig`): dtypes, memory and kernel choices.

    One frozen object handed whole to `Transformer`, `from_pretrained`, `init_model` and on to the layers,
    so a new option is one field here, not a keyword threaded through every call site. None of them
    changes what the model computes, only its precision (dtypes) and how (memory, layout, kernel, tiles):
    results agree to float rounding.
    """

    dtype: Any = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Any = jnp.float32  # dtype the parameters are stored in
    remat: str = "none"  # REMAT_POLICIES: what a layer saves for the backward pass
    scan_layers: bool = False  # stacked [L, ...] layer parameters run by lax.scan (one compiled layer)
    attention: str = "auto"  # ATTENTION_IMPLS: the kernel without a KV cache (`kernels.resolve_attention`)
    attention_block: int = 0  # positions per tile of the attention kernel; 0: the kernel's default
    # Low-rank adapters on these projections (`jdpo.models.lora`); unlike the fields above they are weights of
    # their own, zero-effect at initialisation (B = 0). None: no adapters.
    lora: "LoRASpec | None" = None

    def __post_init__(self):
        if self.attention_block < 0:
            raise ValueError(
                f"attention_block must be >= 0 (0: the kernel's default), got {self.attention_block}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")

    @classmethod
    def from_section(cls, section, *, dtype) -> "ModelOptions":
        """From a run's `jdpo.config.ModelSection`; `dtype` is its compute dtype already resolved (its
        "auto" depends on the device, see `jdpo.train.trainer.resolve_dtype`)."""
        return cls(
            dtype=dtype,
            param_dtype=jnp.dtype(section.param_dtype),
            remat=section.remat,
            scan_layers=section.scan_layers,
            attention=section.attention,
            attention_block=section.attention_block,
        )


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which projections carry a LoRA adapter and its shape: y = x W + (alpha / rank) x A B, with A
    [*in, r] and B [r, *out] stored as `nnx.LoRAParam` (so they split off from the frozen base)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # HF module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    # The frozen base's projection kernels (all seven, adapted or not) stored quantised, "int8" or
    # "nf4" (`jdpo.models.quantize`), and dequantised inside the matmul (QLoRA); "none": param_dtype.
    quantize: str = "none"
    # PEFT's lora_dropout: dropout on the adapter's input x (not on the base path) in training forwards
    # given a dropout key; reference, eval and generation forwards get none.
    dropout: float = 0.0
    site: int = 0  # which projection (PROJECTIONS index): folded into the dropout key

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def for_module(self, name: str) -> "LoRASpec | None":
        return dataclasses.replace(self, site=PROJECTIONS.index(name)) if name in self.targets else None


#: The seven projections of a decoder layer, by their Hugging Face module names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float32 numpy, with linear or Llama-3 scaling."""
    H = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    inv_freq = inv_freq.astype(np.float32)
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by factor, interpolate in between.
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif config.rope_type != "default":
        raise ValueError(f"rope_type {config.rope_type!r} is not implemented")
    return inv_freq


def rope_cos_sin(positions_BxT, config: ModelConfig, dtype):
    """cos, sin [B, T, 1, H] (broadcast over heads) in the compute dtype, like HF's rotary embedding."""
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    return jnp.cos(emb_BxTxH)[:, :, None, :].astype(dtype), jnp.sin(emb_BxTxH)[:, :, None, :].astype(dtype)


def apply_rope(x_BxTxNxH, cos, sin):
    """Rotate-half RoPE (the HF layout: first and second halves of head_dim are the pairs)."""
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return x_BxTxNxH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


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
            self.q_norm = RMSNorm(H, names=("head_dim",), **norm_kw)
            self.k_norm = RMSNorm(H, names=("head_dim",), **norm_kw)
        self.config, self.dtype = c, options.dtype
        self.attention, self.attention_block = options.attention, options.attention_block

    def _qkv(self, x_BxTxD, cos, sin, dropout_key=None):
        """q [B, T, N, H], k and v [B, T, K, H] of new tokens (q/k norm and RoPE applied)."""
        c = self.config
        q_BxTxNxH = self.q_proj(x_BxTxD, self.dtype, dropout_key)
        k_BxTxKxH = self.k_proj(x_BxTxD, self.dtype, dropout_key)
        v_BxTxKxH = self.v_proj(x_BxTxD, self.dtype, dropout_key)
        if c.qk_norm:
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
        if mask.self_attention and kernel == "blocked":
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


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        D, F = config.hidden_size, config.intermediate_size
        kw = dict(bias=False, param_dtype=options.param_dtype, std=config.initializer_range)
        lora = options.lora.for_module if options.lora is not None else (lambda name: None)
        kw["quantize"] = options.lora.quantize if options.lora is not None else "none"
        self.gate_proj = Dense(rngs.params(), (D,), (F,), ("embed", "mlp"), lora=lora("gate_proj"), **kw)
        self.up_proj = Dense(rngs.params(), (D,), (F,), ("embed", "mlp"), lora=lora("up_proj"), **kw)
        self.down_proj = Dense(rngs.params(), (F,), (D,), ("mlp", "embed"), lora=lora("down_proj"), **kw)
        self.act, self.dtype = config.hidden_act, options.dtype

    def __call__(self, x_BxTxD, dropout_key=None):
        gate_BxTxF = self.gate_proj(x_BxTxD, self.dtype, dropout_key)
        if self.act == "silu":
            gate_BxTxF = jax.nn.silu(gate_BxTxF)
        else:  # gelu_pytorch_tanh (checked at config load)
            gate_BxTxF = jax.nn.gelu(gate_BxTxF, approximate=True)
        h_BxTxF = constrain(
            gate_BxTxF * self.up_proj(x_BxTxD, self.dtype, dropout_key), ("batch", "length", "act_mlp")
        )
        return self.down_proj(h_BxTxF, self.dtype, dropout_key)


class DecoderLayer(nnx.Module):
    """Pre-norm block; gemma2 adds norms on the attention and MLP outputs ("sandwich")."""

    def __init__(self, config: ModelConfig, options: ModelOptions, *, rngs: nnx.Rngs):
        c = config

        def norm():
            return RMSNorm(
                c.hidden_size,
                eps=c.rms_norm_eps,
                offset=c.norm_offset,
                dtype=options.dtype,
                param_dtype=options.param_dtype,
            )

        self.input_layernorm = norm()
        self.self_attn = Attention(c, options, rngs=rngs)
        # llama naming: post_attention_layernorm is the pre-MLP norm; gemma2: it normalises attn output.
        self.post_attention_layernorm = norm()
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(c, options, rngs=rngs)
        self.sandwich = c.sandwich_norm

    def __call__(self, x_BxTxD, cos, sin, mask: AttentionMask, dropout_key=None):
        attn_BxTxD = self.self_attn(self.input_layernorm(x_BxTxD), cos, sin, mask, dropout_key)
        return self._finish(x_BxTxD, attn_BxTxD, dropout_key)

    def extend(self, x_BxTxD, cos, sin, mask: AttentionMask, k_BxSxKxH, v_BxSxKxH, slot):
        """The layer on T new tokens with a KV cache (see `Attention.extend`): (x, new k, new v)."""
        attn_BxTxD, k_new, v_new = self.self_attn.extend(
            self.input_layernorm(x_BxTxD), cos, sin, mask, k_BxSxKxH, v_BxSxKxH, slot
        )
        return self._finish(x_BxTxD, attn_BxTxD), k_new, v_new

    def _finish(self, x_BxTxD, attn_BxTxD, dropout_key=None):
        """Residual adds and the MLP after attention."""
        if self.sandwich:
            x_BxTxD = x_BxTxD + self.post_attention_layernorm(attn_BxTxD)
            mlp_BxTxD = self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x_BxTxD), dropout_key)
            )
        else:
            x_BxTxD = x_BxTxD + attn_BxTxD
            mlp_BxTxD = self.mlp(self.post_attention_layernorm(x_BxTxD), dropout_key)
        return constrain(x_BxTxD + mlp_BxTxD, ("batch", "length", "act_embed"))


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "dots_saveable":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {policy!r}")


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids)` -> float32 logits; `hidden_states` + `unembedding` for chunked log-probs.

    `options.scan_layers` stacks the layers ([L, ...] parameters) and runs them with `jax.lax.scan`, so
    deep models compile once per layer instead of once per depth. gemma2's alternating local/global
    layers scan too: a per-layer boolean array picks the layer's mask (`AttentionMask.for_layer`) inside
    the scanned body.
    """

    def __init__(self, config: ModelConfig, *, options: ModelOptions | None = None, rngs: nnx.Rngs):
        options = ModelOptions() if options is None else options  # None: the defaults
        # "auto" and a 0 block become the kernel that runs and its tile here, once for every layer.
        choice = resolve_attention(options.attention, config)
        if options.attention_block and (
            why := attention_block_problem(choice.kernel, options.attention_block)
        ):
            raise ConfigError(f"{why} ({choice.reason})")
        block = options.attention_block or default_block(choice.kernel)
        options = dataclasses.replace(options, attention=choice.kernel, attention_block=block)
        self.attention_reason = choice.reason  # what the run log says about the kernel
        c, dtype, param_dtype = config, options.dtype, options.param_dtype
        self.embed_tokens = Embedding(c, param_dtype=param_dtype, rngs=rngs)
        if options.scan_layers:

            @nnx.split_rngs(splits=c.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return DecoderLayer(c, options, rngs=rngs)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(c, options, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype, param_dtype=param_dtype
        )
        if not c.tie_word_embeddings:
            self.lm_head = Dense(
                rngs.params(),
                (c.hidden_size,),
                (c.vocab_size,),
                ("embed", "vocab"),
                bias=False,
                param_dtype=param_dtype,
                std=c.initializer_range,
            )
        self.config, self.options = c, options

    def _embed(self, input_ids_BxT):
        """Token embeddings [B, T, D] in the compute dtype (gemma: scaled by sqrt(D))."""
        # The lookup gathers rows of a vocab-sharded table: gather the model dim (fsdp) first so XLA does a
        # local gather + all-reduce over tensor instead of replicating the table.
        table_VxD = constrain(
            self.embed_tokens.embedding[...].astype(self.options.dtype), ("act_vocab", "act_embed")
        )
        x_BxTxD = table_VxD[input_ids_BxT]
        if self.config.scale_embeddings:
            # HF gemma rounds sqrt(D) to the compute dtype before multiplying; so do we.
            x_BxTxD = x_BxTxD * jnp.asarray(self.config.hidden_size**0.5, self.options.dtype)
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))

    def hidden_states(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None, dropout_key=None):
        """Final hidden states [B, T, D] in the compute dtype, final norm applied. `dropout_key`: a
        training forward with LoRA dropout (layer i's projections fold in i, then their site)."""
        c = self.config
        B, T = input_ids_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BxTxD = self._embed(input_ids_BxT)
        cos, sin = rope_cos_sin(positions_BxT, c, self.options.dtype)
        flags = c.sliding_layers
        # Without segment ids the row is one sequence (segment 1 everywhere).
        ids_BxT = jnp.ones((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT
        mask = AttentionMask(ids_BxT, window=c.sliding_window if any(flags) else None)

        def layer_fn(graphdef, state, x, is_sliding, i):
            layer = nnx.merge(graphdef, state)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            return layer(x, cos, sin, mask.for_layer(is_sliding), key)

        remat = self.options.remat
        if self.options.scan_layers:
            graphdef, state = nnx.split(self.layers)
            body = _remat(lambda x, xs: (layer_fn(graphdef, xs[0], x, xs[1], xs[2]), None), remat)
            layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
            x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, (state, jnp.asarray(flags), layer_ids))
        else:
            for i, (layer, is_sliding) in enumerate(zip(self.layers, flags, strict=True)):
                graphdef, state = nnx.split(layer)
                fn = _remat(lambda s, x, gd=graphdef, f=is_sliding, i=i: layer_fn(gd, s, x, f, i), remat)
                x_BxTxD = fn(state, x_BxTxD)
        return self.norm(x_BxTxD)

    def unembedding(self):
        """Unembedding [D, V] in the compute dtype (tied: the embedding matrix transposed)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].T.astype(self.options.dtype)
        return self.lm_head.kernel[...].astype(self.options.dtype)

    def logits(self, h_BxTxD):
        """Logits [B, T, V] in float32 from final hidden states (final soft-cap applied when configured)."""
        logits_BxTxV = jnp.einsum(
            "BTD,DV->BTV", h_BxTxD, self.unembedding(), preferred_element_type=jnp.float32
        )
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits_BxTxV = jnp.tanh(logits_BxTxV / cap) * cap
        return constrain(logits_BxTxV, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None):
        """Logits [B, T, V] in float32 (final soft-cap applied when the config has one)."""
        return self.logits(self.hidden_states(input_ids_BxT, positions_BxT, segment_ids_BxT))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache: {"k", "v"} [L, B, S, K, H] (S = max_length) in `dtype` (default: the compute
        dtype), layer-stacked for both layer layouts. See `extend` for how it is filled."""
        c = self.config
        shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim)
        dtype = self.options.dtype if dtype is None else dtype
        names = ("layers", "batch", "length", "act_kv_heads", None)
        return {
            "k": constrain(jnp.zeros(shape, dtype), names),
            "v": constrain(jnp.zeros(shape, dtype), names),
        }

    def extend(self, input_ids_BxT, cache: dict, slot, start_B):
        """Run T new tokens per row at cache slots [slot, slot + T) and store their keys / values.

        Rows are left-padded: row b's real tokens occupy slots >= start_B[b], so its token at slot s has
        position s - start_B[b], and every row writes the same slots each call (one dynamic_update_slice,
        fixed shapes: prefill is one call with T = prompt length at slot 0, decoding calls with T = 1 at
        slot = prompt length + step). A query sees the slots at or before its own that hold real tokens
        (padding is never attended; a padding query sees only padding, so nothing is NaN), within the
        sliding window on sliding layers (slot distance == position distance for real tokens): the mask
        is `AttentionMask.kv_cache`. The whole cache stays resident on sliding layers too (masked, not a
        ring buffer).

        Args:
          input_ids_BxT: int32 token ids. cache: from `init_cache` (or a previous `extend`).
          slot: int32 scalar, may be traced. start_B: int32 [B], first real slot of each row.
        Returns (hidden [B, T, D] with the final norm applied, updated cache); `logits(hidden)` gives logits.
        """
        c = self.config
        B, T = input_ids_BxT.shape
        S = cache["k"].shape[2]
        q_slot_T = slot + jnp.arange(T, dtype=jnp.int32)
        positions_BxT = jnp.maximum(q_slot_T[None, :] - start_B[:, None], 0)
        x_BxTxD = self._embed(input_ids_BxT)
        cos, sin = rope_cos_sin(positions_BxT, c, self.options.dtype)
        flags = c.sliding_layers
        mask = AttentionMask.kv_cache(start_B, slot, T, S, window=c.sliding_window if any(flags) else None)

        def layer_fn(layer, x, k_BxSxKxH, v_BxSxKxH, is_sliding):
            return layer.extend(x, cos, sin, mask.for_layer(is_sliding), k_BxSxKxH, v_BxSxKxH, slot)

        k_all, v_all = cache["k"], cache["v"]

        def store(all_LxBxSxKxH, new_BxTxKxH, i):
            # Only the T new slots are written: the cache is updated in place under donation / loops.
            start = (i, 0, slot, 0, 0)
            return jax.lax.dynamic_update_slice(
                all_LxBxSxKxH, new_BxTxKxH[None].astype(all_LxBxSxKxH.dtype), start
            )

        if self.options.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(carry, xs):
                x, k_all, v_all = carry
                layer_state, is_sliding, i = xs
                layer = nnx.merge(graphdef, layer_state)
                x, k_new, v_new = layer_fn(layer, x, k_all[i], v_all[i], is_sliding)
                return (x, store(k_all, k_new, i), store(v_all, v_new, i)), None

            xs = (state, jnp.asarray(flags), jnp.arange(c.num_layers, dtype=jnp.int32))
            (x_BxTxD, k_all, v_all), _ = jax.lax.scan(body, (x_BxTxD, k_all, v_all), xs)
        else:
            for i, (layer, is_sliding) in enumerate(zip(self.layers, flags, strict=True)):
                x_BxTxD, k_new, v_new = layer_fn(layer, x_BxTxD, k_all[i], v_all[i], is_sliding)
                k_all, v_all = store(k_all, k_new, i), store(v_all, v_new, i)
        return self.norm(x_BxTxD), {"k": k_all, "v": v_all}
