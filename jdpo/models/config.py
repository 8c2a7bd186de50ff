"""What a decoder is (`ModelConfig`) and how it is read from / written to a Hugging Face config.json.

`config_from_hf` turns a config.json into a `ModelConfig`, refusing anything it would get wrong (unknown
model_type, unimplemented rope scaling, unsupported activations or biases) with a message that names the
field. Family differences are fields of `ModelConfig` (switches the one decoder reads), never subclasses.
No JAX here: a config is plain data.
"""

import dataclasses
import json
import math
import os
from typing import Any

from jdpo.errors import UserError

FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo3", "smollm3",
    "phi3", "qwen3_moe", "mixtral", "gpt_oss",
)  # fmt: skip
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
_MOE = ("qwen3_moe", "mixtral", "gpt_oss")
# Families whose sliding and full layers have their own RoPE parameters (`rope_parameters` per layer type).
_PER_TYPE_ROPE = ("gemma3_text", "olmo3")
# transformers' RoPE base when a config.json names none (global, local).
_DEFAULT_THETA = {"gemma3_text": (1e6, 1e4), "olmo3": (5e5, 5e5), "smollm3": (2e6, None)}
_GEMMA = ("gemma", "gemma2", "gemma3_text")

# Fields that change the numbers but that this decoder does not implement; a non-default value is an error.
_UNSUPPORTED_IF_SET = {
    "mlp_bias": (False, None),
    "partial_rotary_factor": (1.0, None),
    "attention_chunk_size": (None,),
    "use_qk_norm": (False, None),
    "logits_scaling": (1.0, None),
    "use_bidirectional_attention": (False, None),
}


class ModelConfigError(UserError, ValueError):
    """A config.json this decoder cannot run; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder; built from a Hugging Face config.json by `from_hf`."""

    family: str  # one of FAMILIES
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N query heads
    num_kv_heads: int  # K key/value heads (K == N: multi-head, K < N: grouped-query)
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | longrope
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3, longrope
    # longrope (phi3): per-frequency divisors [H/2] for rows within / beyond the original length, and the
    # scale of cos and sin
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0  # longrope, yarn: cos and sin scaled by it
    rope_beta_fast: float = 32.0  # yarn (gpt_oss): the ramp's bounds in rotations, and whether they round
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    # gemma3 / olmo3: the RoPE base of the sliding layers (unscaled); None: the global one on every layer
    local_rope_theta: float | None = None
    # smollm3 (no_rope_layers): per layer, does it rotate q and k; () = every layer does
    rope_layers: tuple[bool, ...] = ()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    qkv_bias: bool = False  # qwen2; llama with attention_bias
    o_bias: bool = False  # llama with attention_bias
    qk_norm: bool = False  # qwen3, gemma3, olmo2/3: RMSNorm on q and k before RoPE
    qk_norm_scope: str = "head"  # "head": over head_dim (qwen3, gemma3); "projection": over N*H (olmo2/3)
    norm_offset: float = 0.0  # gemma: norms scale by (1 + w)
    scale_embeddings: bool = False  # gemma: embeddings * sqrt(D), in compute dtype
    sandwich_norm: bool = False  # gemma2/3: post-attention, pre/post-feedforward norms
    post_norm: bool = False  # olmo2/3: norms on the attention and MLP outputs only, none on their inputs
    fused_projections: bool = False  # phi3: q/k/v as one qkv_proj, gate/up as one gate_up_proj
    sliding_window: int | None = None  # a key j is visible from query i when i - j < sliding_window
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () = all full
    attn_logit_softcapping: float | None = None  # gemma2
    final_logit_softcapping: float | None = None  # gemma2; also passed to the chunked log-prob path
    query_pre_attn_scalar: float | None = None  # gemma2: scores scale by query_pre_attn_scalar**-0.5
    initializer_range: float = 0.02
    # Mixture of experts (`jdpo.models.moe`; qwen3_moe, mixtral): E experts of F_e = moe_intermediate_size,
    # each token routed to its top `experts_per_token` of a float32 softmax over E (renormalised over the
    # chosen ones with norm_topk_prob, always on mixtral). 0 experts: a dense model.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    # per layer: is its MLP the experts (qwen3_moe's decoder_sparse_step / mlp_only_layers); () = every layer
    moe_layers: tuple[bool, ...] = ()
    router_aux_loss_coef: float = 0.0  # the checkpoint's (config.json); the run's default coefficient
    # gpt_oss: biases on the router and the experts, the clamped SwiGLU (gate <= limit, |up| <= limit,
    # (up + 1) * gate * sigmoid(1.702 gate); gate and up interleaved in one kernel), and a learned sink
    # logit per head in every attention softmax
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    attention_sinks: bool = False
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    @classmethod
    def from_hf(cls, config_or_path) -> "ModelConfig":
        """From a HF config dict, a config.json path, or a checkpoint directory. Errors name the field."""
        return config_from_hf(config_or_path)

    def to_hf(self) -> dict:
        """A config.json dict that `transformers.AutoConfig` reads back to the same architecture."""
        return config_to_hf(self)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if not self.layer_types:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" and self.sliding_window is not None for t in self.layer_types)

    @property
    def layer_rope(self) -> tuple[int, ...]:
        """Per layer, which RoPE it applies: 0 the global one, 1 the sliding layers' own base
        (`local_rope_theta`), 2 none (a NoPE layer)."""
        rope = self.rope_layers or (True,) * self.num_layers
        local = self.local_rope_theta is not None
        return tuple(
            2 if not r else (1 if local and s else 0) for r, s in zip(rope, self.sliding_layers, strict=True)
        )

    @property
    def expert_layers(self) -> tuple[bool, ...]:
        """Per layer: is its MLP a mixture of experts?"""
        if not self.num_experts:
            return (False,) * self.num_layers
        return self.moe_layers or (True,) * self.num_layers

    @property
    def mixes_layer_kinds(self) -> bool:
        """Do its layers mix experts and dense MLPs (qwen3_moe's mlp_only_layers)? Such a stack cannot be
        one scanned body."""
        return len(set(self.expert_layers)) > 1

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
        qk = (N + K) * H if self.qk_norm_scope == "projection" else 2 * H
        norms = D * (4 if self.sandwich_norm else 2) + qk * self.qk_norm
        moe, E = sum(self.expert_layers), self.num_experts
        experts = moe * (D * E + E * self.router_bias + E * self._per_expert())
        mlp = (L - moe) * 3 * D * F + experts
        return (
            V * D * (1 if self.tie_word_embeddings else 2)
            + D
            + L * (attn + norms + N * self.attention_sinks)
            + mlp
        )

    def _per_expert(self) -> int:
        """Parameters of one expert (gpt_oss: with its biases)."""
        D, Fe = self.hidden_size, self.moe_intermediate_size
        return 3 * D * Fe + self.expert_bias * (2 * Fe + D)

    def num_active_params(self) -> int:
        """Parameters one token runs through: `num_params` with only `experts_per_token` of each MoE
        layer's experts (the router counts whole). The MFU of an MoE model counts these."""
        idle = self.num_experts - self.experts_per_token
        return self.num_params() - sum(self.expert_layers) * idle * self._per_expert()


def _read_config(config_or_path) -> dict:
    if isinstance(config_or_path, dict):
        return dict(config_or_path)
    path = os.fspath(config_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ModelConfigError("no such file: give a Hugging Face checkpoint directory (config.json, "
                               "tokenizer, *.safetensors)")  # fmt: skip
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"not valid JSON ({e})") from None


def _tuple(x):
    return tuple(x) if isinstance(x, list) else x


def _rope_parameters(hf: dict, family: str) -> tuple[dict, dict | None]:
    """(global, sliding-layer) rope parameters from either the transformers>=5 `rope_parameters` (one
    dict, or one per layer type) or the legacy `rope_theta` / `rope_scaling` / `rope_local_base_freq`."""
    params = hf.get("rope_parameters") or {}
    if family == "gpt_oss" and not params and not hf.get("rope_scaling"):  # transformers' default
        params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096,
                  "rope_theta": hf.get("rope_theta") or 150000.0}  # fmt: skip
    theta, local_theta = _DEFAULT_THETA.get(family, (10000.0, None))
    per_type = "full_attention" in params or "sliding_attention" in params
    if per_type and family not in _PER_TYPE_ROPE:
        raise ModelConfigError(f"{family}: rope_parameters per layer type are not supported")
    glob = dict(params.get("full_attention") or {}) if per_type else dict(params)
    if hf.get("rope_scaling"):
        glob.update(hf["rope_scaling"])
    glob.setdefault("rope_theta", hf.get("rope_theta") or theta)
    if family not in _PER_TYPE_ROPE:
        return glob, None
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or hf.get("rope_theta") or local_theta)
    return glob, local


def _rope(params: dict, hf: dict, field: str) -> dict:
    """The `ModelConfig` rope fields of one rope parameter dict; `field` names it in errors."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)  # phi3's legacy name
    # YaRN is checked against transformers for gpt_oss only; elsewhere it stays refused
    if rope_type not in ROPE_TYPES or (rope_type == "yarn" and hf.get("model_type") != "gpt_oss"):
        raise ModelConfigError(
            f"{field}.rope_type={rope_type!r} is not implemented (supported: {', '.join(ROPE_TYPES)}; "
            "yarn on gpt_oss)"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError(f"{field}.partial_rotary_factor={params['partial_rotary_factor']} is not "
                               "supported (RoPE over the whole head only)")  # fmt: skip
    out: dict[str, Any] = {"rope_theta": float(params["rope_theta"]), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if rope_type == "longrope":
        original = int(
            params.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
        )
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # the LongRoPE paper's default, as transformers computes it
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        out.update(
            rope_factor=float(factor),
            rope_original_max_position_embeddings=original,
            rope_short_factor=tuple(float(x) for x in params["short_factor"]),
            rope_long_factor=tuple(float(x) for x in params["long_factor"]),
            rope_attention_factor=float(attention_factor),
        )
    elif rope_type == "yarn":  # transformers' _compute_yarn_parameters
        factor = float(params["factor"])
        attention_factor = params.get("attention_factor")
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise ModelConfigError(f"{field}: yarn's mscale / mscale_all_dim are not implemented")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
        out.update(
            rope_factor=factor,
            rope_original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            rope_attention_factor=float(attention_factor),
            rope_beta_fast=float(params.get("beta_fast") or 32),
            rope_beta_slow=float(params.get("beta_slow") or 1),
            rope_truncate=bool(params.get("truncate", True)),
        )
    elif params.get("attention_factor") not in (None, 1.0):
        raise ModelConfigError(f"{field}.attention_factor={params['attention_factor']} is not implemented")
    return out


def config_from_hf(config_or_path) -> ModelConfig:
    """Read a HF config (dict, config.json, or checkpoint dir) into a ModelConfig; errors name the field
    (and the file, when read from one)."""
    where = ""
    if not isinstance(config_or_path, dict):
        path = os.fspath(config_or_path)
        where = f"{os.path.join(path, 'config.json') if os.path.isdir(path) else path}: "
    try:
        return _config_from_dict(_read_config(config_or_path))
    except ModelConfigError as e:
        raise ModelConfigError(f"{where}{e}") from None
    except KeyError as e:
        raise ModelConfigError(f"{where}no field {e} (is it a decoder's config?)") from None


def _family_fields(family: str, hf: dict) -> dict:
    """The switches of one family (what sets it apart from llama)."""
    attention_bias = bool(hf.get("attention_bias", family == "gpt_oss"))
    if family in (*_GEMMA, "phi3") and attention_bias:
        raise ModelConfigError(f"{family}: attention_bias=True is not supported")
    kw: dict[str, Any] = {}
    if family == "qwen2":
        kw["qkv_bias"] = True  # qwen2 always has q/k/v bias and never an o_proj bias
    elif family not in (*_GEMMA, "phi3"):
        kw["qkv_bias"] = kw["o_bias"] = attention_bias
    if family in ("qwen3", "qwen3_moe", "gemma3_text"):
        kw["qk_norm"] = True
    if family in ("olmo2", "olmo3"):
        kw.update(qk_norm=True, qk_norm_scope="projection", post_norm=True)
    if family in _GEMMA:
        kw.update(norm_offset=1.0, scale_embeddings=True)
    if family in ("gemma2", "gemma3_text"):
        kw.update(
            sandwich_norm=True,
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        )
    if family == "phi3":
        kw["fused_projections"] = True
    if family in _MOE:
        kw.update(_moe_fields(family, hf))
    if family == "smollm3":
        flags = hf.get("no_rope_layers")  # 1: the layer applies RoPE (the name is transformers')
        if flags is None:
            interval = hf.get("no_rope_layer_interval", 4)
            flags = [int((i + 1) % interval != 0) for i in range(hf["num_hidden_layers"])]
        if len(flags) != hf["num_hidden_layers"] or set(flags) - {0, 1}:
            raise ModelConfigError(f"smollm3: no_rope_layers={flags!r} must be one 0 / 1 per layer")
        kw["rope_layers"] = tuple(bool(f) for f in flags)
    return kw


def _moe_fields(family: str, hf: dict) -> dict:
    """The experts of qwen3_moe / mixtral: their count, size, top-k and which layers have them."""
    L = hf["num_hidden_layers"]
    extra: dict[str, Any] = {}
    if family == "gpt_oss":
        if hf.get("quantization_config"):
            raise ModelConfigError(
                f"gpt_oss: quantization_config={hf['quantization_config'].get('quant_method')!r}: jdpo reads "
                "the experts unquantised (bfloat16 / float32 gate_up_proj, down_proj), not MXFP4 blocks; "
                "use a dequantised (BF16) export of the checkpoint"
            )
        if hf.get("swiglu_alpha", 1.702) != 1.702:
            raise ModelConfigError(f"gpt_oss: swiglu_alpha={hf['swiglu_alpha']} is not supported (1.702)")
        E, F, norm, moe = hf.get("num_local_experts", 128), hf["intermediate_size"], True, ()
        extra = dict(router_bias=True, expert_bias=True, swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                     attention_sinks=True)  # fmt: skip
    elif family == "mixtral":
        if hf.get("router_jitter_noise", 0.0):
            raise ModelConfigError(f"mixtral: router_jitter_noise={hf['router_jitter_noise']} is not "
                                   "implemented (set it to 0.0)")  # fmt: skip
        E, F, norm, moe = hf.get("num_local_experts", 8), hf["intermediate_size"], True, ()
    else:
        # transformers 5 writes num_local_experts (its attribute for num_experts)
        E = hf.get("num_experts", hf.get("num_local_experts", 128))
        F, norm = hf.get("moe_intermediate_size", 768), hf.get("norm_topk_prob")
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
        if step < 1 or dense - set(range(L)):
            raise ModelConfigError(f"qwen3_moe: decoder_sparse_step={step} / mlp_only_layers={sorted(dense)} "
                                   f"do not describe {L} layers")  # fmt: skip
        moe = tuple(i not in dense and E > 0 and (i + 1) % step == 0 for i in range(L))
        moe = () if all(moe) else moe
    k = hf.get("num_experts_per_tok", {"mixtral": 2, "gpt_oss": 4}.get(family, 8))
    if E > 0 and not 1 <= k <= E:
        raise ModelConfigError(f"{family}: num_experts_per_tok={k} must be between 1 and the {E} experts")
    return dict(
        num_experts=E, experts_per_token=k, moe_intermediate_size=F, norm_topk_prob=bool(norm),
        moe_layers=moe, router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0), **extra,
    )  # fmt: skip


def _layer_types(family: str, hf: dict, L: int) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding window, layer types) of a family. mistral and phi3 apply the window to every layer; qwen
    only with use_sliding_window and from max_window_layers on; smollm3 only with use_sliding_window; the
    gemma2/3 and olmo3 layers marked "sliding_attention" (by default gemma2 every other one, gemma3 five
    of six, olmo3 three of four)."""
    window = hf.get(
        "sliding_window", {"gemma3_text": 4096, "olmo3": 4096, "gpt_oss": 128}.get(family)
    )  # HF defaults
    layer_types = hf.get("layer_types")
    if family in ("qwen2", "qwen3", "qwen3_moe", "smollm3") and not hf.get("use_sliding_window", False):
        window = None
    if family in ("mistral", "phi3", "mixtral") and window is not None:
        layer_types = ["sliding_attention"] * L
    elif family in ("qwen2", "qwen3", "qwen3_moe") and layer_types is None and window is not None:
        first = hf.get("max_window_layers", L)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
    elif family == "gemma2" and layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    elif family == "gemma3_text" and layer_types is None:
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    elif family == "gpt_oss" and layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    elif family == "olmo3" and layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(L)]
    elif family in ("llama", "gemma", "olmo2"):
        window, layer_types = None, None
    if layer_types is not None and (
        len(layer_types) != L or set(layer_types) - {"sliding_attention", "full_attention"}
    ):
        raise ModelConfigError(f"{family}: layer_types={layer_types!r} is not supported")
    window = window if any(t == "sliding_attention" for t in layer_types or ()) else None
    return window, tuple(layer_types) if layer_types is not None else None


def _config_from_dict(hf: dict) -> ModelConfig:
    if hf.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration: the vision + text checkpoint
        raise ModelConfigError(
            "model_type='gemma3' is the multimodal Gemma 3 checkpoint (its text weights are nested under "
            "language_model); jdpo loads the text-only model_type 'gemma3_text' (Gemma-3-1B and text-only "
            "exports)"
        )
    heads = [a for a in hf.get("architectures") or () if not str(a).endswith("ForCausalLM")]
    if heads:
        raise ModelConfigError(
            f"field 'architectures' is {hf['architectures']!r}, not a causal language model (*ForCausalLM): "
            "DPO trains the next-token head, which a classification / reward / base model has not; "
            "give the checkpoint of a causal LM"
        )
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ModelConfigError(f"model_type={family!r} is not supported (supported: {', '.join(FAMILIES)})")
    for field, ok in _UNSUPPORTED_IF_SET.items():
        if field in hf and hf[field] not in ok:
            raise ModelConfigError(f"{family}: config field {field}={hf[field]!r} is not supported")
    D, N, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    act_field = "hidden_activation" if family in _GEMMA[1:] and hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_field) or "silu"
    if family == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # HF does the same: legacy gemma configs meant the tanh approximation
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise ModelConfigError(f"{family}: {act_field}={act!r} is not supported (silu, gelu_pytorch_tanh)")
    glob, local = _rope_parameters(hf, family)
    rope = _rope(glob, hf, "rope_parameters.full_attention" if local is not None else "rope_parameters")
    window, layer_types = _layer_types(family, hf, L)
    if local is not None and window is not None:
        local_rope = _rope(local, hf, "rope_parameters.sliding_attention")
        if local_rope["rope_type"] != "default":
            kind = local_rope["rope_type"]
            raise ModelConfigError(
                f"{family}: rope_parameters.sliding_attention.rope_type={kind!r}: only default is supported"
            )
        # A separate base only where it differs (a scaled global RoPE differs at an equal theta).
        if local_rope["rope_theta"] != rope["rope_theta"] or rope["rope_type"] != "default":
            rope["local_rope_theta"] = local_rope["rope_theta"]
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=D,
        intermediate_size=hf["intermediate_size"],
        num_layers=L,
        num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or (64 if family == "gpt_oss" else D // N),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family in (*_GEMMA, "smollm3"))),
        hidden_act=act,
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=_tuple(hf.get("bos_token_id")),
        eos_token_id=_tuple(hf.get("eos_token_id")),
        pad_token_id=_tuple(hf.get("pad_token_id")),
        sliding_window=window,
        layer_types=layer_types or (),
        **rope,
        **_family_fields(family, hf),
    )


def _rope_to_hf(c: ModelConfig) -> dict:
    rope: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "llama3", "longrope", "yarn"):
        rope["factor"] = c.rope_factor
    if c.rope_type == "yarn":
        rope.update(beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, truncate=c.rope_truncate,
                    attention_factor=c.rope_attention_factor)  # fmt: skip
    if c.rope_type in ("llama3", "longrope", "yarn"):
        rope["original_max_position_embeddings"] = c.rope_original_max_position_embeddings
    if c.rope_type == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    if c.rope_type == "longrope":
        rope.update(
            short_factor=list(c.rope_short_factor),
            long_factor=list(c.rope_long_factor),
            attention_factor=c.rope_attention_factor,
        )
    return rope


def config_to_hf(c: ModelConfig) -> dict:
    """config.json dict for `transformers` (both the >=5 `rope_parameters` and the legacy rope keys)."""
    rope = _rope_to_hf(c)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[c.family]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": c.hidden_act,
        "initializer_range": c.initializer_range,
        "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if c.rope_type != "default":
        hf["rope_scaling"] = rope
    if c.family in _PER_TYPE_ROPE:
        local = {"rope_type": "default", "rope_theta": c.local_rope_theta or c.rope_theta}
        hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
        del hf["rope_theta"]
        hf.pop("rope_scaling", None)
    if c.family == "phi3":
        hf["original_max_position_embeddings"] = c.rope_original_max_position_embeddings
    if c.family in ("llama", "mistral", "qwen3", "olmo2", "olmo3", "smollm3", "qwen3_moe", "gpt_oss"):
        hf["attention_bias"] = c.qkv_bias
    if c.family in ("gemma2", "gemma3_text"):
        hf.update(
            hidden_activation=c.hidden_act,
            attn_logit_softcapping=c.attn_logit_softcapping,
            final_logit_softcapping=c.final_logit_softcapping,
            query_pre_attn_scalar=c.query_pre_attn_scalar,
        )
    if c.family in ("mistral", "gemma2", "gemma3_text", "olmo3", "phi3", "mixtral", "gpt_oss"):
        hf["sliding_window"] = c.sliding_window
    if c.family in _MOE:
        hf.update(_moe_to_hf(c))
    if c.family in ("qwen2", "qwen3", "qwen3_moe", "smollm3"):
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window)
    if c.family in ("qwen2", "qwen3", "qwen3_moe"):
        hf["max_window_layers"] = c.num_layers
    if c.family == "smollm3":
        hf["no_rope_layers"] = [int(r) for r in c.rope_layers or (True,) * c.num_layers]
    if c.layer_types and c.family not in ("mistral", "phi3", "mixtral"):
        hf["layer_types"] = list(c.layer_types)
    return hf


def _moe_to_hf(c: ModelConfig) -> dict:
    """The experts' config.json fields (see `_moe_fields`)."""
    hf: dict[str, Any] = {
        "num_experts_per_tok": c.experts_per_token,
        "router_aux_loss_coef": c.router_aux_loss_coef,
    }
    if c.family == "mixtral":
        return {**hf, "num_local_experts": c.num_experts, "router_jitter_noise": 0.0}
    if c.family == "gpt_oss":
        return {
            **hf,
            "num_local_experts": c.num_experts,
            "swiglu_limit": c.swiglu_limit,
            "swiglu_alpha": 1.702,
        }
    dense = [i for i, moe in enumerate(c.expert_layers) if not moe]
    return {
        **hf, "num_experts": c.num_experts, "moe_intermediate_size": c.moe_intermediate_size,
        "norm_topk_prob": c.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": dense,
    }  # fmt: skip
