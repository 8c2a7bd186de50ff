"""Per-family config readers and the HF weight-name tables.

`config_from_hf` turns a Hugging Face config.json into a `ModelConfig`, refusing anything it would get
wrong (unknown model_type, unimplemented rope scaling, unsupported activations or biases) with a message
that names the field. `weight_table` lists, for one config, every model parameter with its HF name and
the layout change between the two.

Layouts: HF stores nn.Linear weights as [out, in]; the model keeps [in, out] with heads split out.
A layout is (groups, perm): reshape the HF tensor so HF dim i becomes the factors groups[i], then
transpose by perm to get the model's array. Export applies the inverse.
"""

import dataclasses
import json
import math
import os
from typing import Any

from jdpo.errors import UserError
from jdpo.models.transformer import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
ROPE_TYPES = ("default", "linear", "llama3")

# Fields that change the numbers but that this decoder does not implement; a non-default value is an error.
_UNSUPPORTED_IF_SET = {
    "mlp_bias": (False, None),
    "partial_rotary_factor": (1.0, None),
    "attention_chunk_size": (None,),
    "use_qk_norm": (False, None),
    "logits_scaling": (1.0, None),
}


class ModelConfigError(UserError, ValueError):
    """A config.json this decoder cannot run; the message names the file and the field."""


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


def _rope(hf: dict) -> dict:
    """Rope fields from either the transformers>=5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params = {**params, **hf["rope_scaling"]}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        raise ModelConfigError("rope_parameters per layer type are not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelConfigError(
            f"rope_scaling.rope_type={rope_type!r} is not implemented (supported: {', '.join(ROPE_TYPES)})"
        )
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if params.get("attention_factor") not in (None, 1.0):
        raise ModelConfigError(
            f"rope_scaling.attention_factor={params['attention_factor']} is not implemented"
        )
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


def _config_from_dict(hf: dict) -> ModelConfig:
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
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    act_field = "hidden_activation" if family == "gemma2" and hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_field) or "silu"
    if family == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # HF does the same: legacy gemma configs meant the tanh approximation
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise ModelConfigError(f"{family}: {act_field}={act!r} is not supported (silu, gelu_pytorch_tanh)")
    attention_bias = bool(hf.get("attention_bias", False))
    if family in ("gemma", "gemma2") and attention_bias:
        raise ModelConfigError(f"{family}: attention_bias=True is not supported")
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=D,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or D // N,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family in ("gemma", "gemma2"))),
        hidden_act=act,
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=_tuple(hf.get("bos_token_id")),
        eos_token_id=_tuple(hf.get("eos_token_id")),
        pad_token_id=_tuple(hf.get("pad_token_id")),
        **_rope(hf),
    )
    if family == "qwen2":
        kw["qkv_bias"] = True  # qwen2 always has q/k/v bias and never an o_proj bias
    elif family in ("llama", "mistral", "qwen3"):
        kw["qkv_bias"] = kw["o_bias"] = attention_bias
    if family == "qwen3":
        kw["qk_norm"] = True
    if family in ("gemma", "gemma2"):
        kw.update(norm_offset=1.0, scale_embeddings=True)
    if family == "gemma2":
        kw.update(
            sandwich_norm=True,
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        )
    # Sliding window: mistral applies it to every layer; qwen only with use_sliding_window and from
    # max_window_layers on; gemma2 on the layers marked "sliding_attention" (even ones by default).
    window = hf.get("sliding_window")
    L = kw["num_layers"]
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    layer_types = hf.get("layer_types")
    if family == "mistral" and window is not None:
        layer_types = ["sliding_attention"] * L
    elif family in ("qwen2", "qwen3") and layer_types is None and window is not None:
        first = hf.get("max_window_layers", L)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
    elif family == "gemma2" and layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    elif family in ("llama", "gemma"):
        window, layer_types = None, None
    if layer_types is not None:
        if len(layer_types) != L or set(layer_types) - {"sliding_attention", "full_attention"}:
            raise ModelConfigError(f"{family}: layer_types={layer_types!r} is not supported")
        kw["layer_types"] = tuple(layer_types)
    kw["sliding_window"] = window if any(t == "sliding_attention" for t in layer_types or ()) else None
    return ModelConfig(**kw)


def config_to_hf(c: ModelConfig) -> dict:
    """config.json dict for `transformers` (both the >=5 `rope_parameters` and the legacy rope keys)."""
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma": "GemmaForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
    }
    rope: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "llama3"):
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(
            low_freq_factor=c.rope_low_freq_factor,
            high_freq_factor=c.rope_high_freq_factor,
            original_max_position_embeddings=c.rope_original_max_position_embeddings,
        )
    hf: dict[str, Any] = {
        "architectures": [arch[c.family]],
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
    if c.family in ("llama", "mistral", "qwen3"):
        hf["attention_bias"] = c.qkv_bias
    if c.family == "gemma2":
        hf.update(
            hidden_activation=c.hidden_act,
            attn_logit_softcapping=c.attn_logit_softcapping,
            final_logit_softcapping=c.final_logit_softcapping,
            query_pre_attn_scalar=c.query_pre_attn_scalar,
        )
    if c.family in ("mistral", "gemma2"):
        hf["sliding_window"] = c.sliding_window
    if c.family in ("qwen2", "qwen3"):
        hf.update(
            use_sliding_window=c.sliding_window is not None,
            sliding_window=c.sliding_window,
            max_window_layers=c.num_layers,
        )
    if c.layer_types and c.family != "mistral":
        hf["layer_types"] = list(c.layer_types)
    return hf


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One model parameter: where it lives in the model, its HF name, and the layout change."""

    model_path: str  # dotted path in the model, "{i}" for the layer index
    hf_key: str  # HF tensor name, "{i}" for the layer index
    groups: tuple[tuple[int, ...], ...]  # HF dim i is reshaped into the factors groups[i]
    perm: tuple[int, ...]  # then transposed by perm into the model's layout

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.groups)


# Per layer: (model path, HF name, layout). The layouts are resolved against the config's sizes below.
_LAYER_COMMON = [
    ("input_layernorm.weight", "input_layernorm.weight", "vector_D"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight", "vector_D"),
    ("self_attn.q_proj.kernel", "self_attn.q_proj.weight", "NHxD->DNH"),
    ("self_attn.k_proj.kernel", "self_attn.k_proj.weight", "KHxD->DKH"),
    ("self_attn.v_proj.kernel", "self_attn.v_proj.weight", "KHxD->DKH"),
    ("self_attn.o_proj.kernel", "self_attn.o_proj.weight", "DxNH->NHD"),
    ("mlp.gate_proj.kernel", "mlp.gate_proj.weight", "FxD->DF"),
    ("mlp.up_proj.kernel", "mlp.up_proj.weight", "FxD->DF"),
    ("mlp.down_proj.kernel", "mlp.down_proj.weight", "DxF->FD"),
]
_LAYER_QKV_BIAS = [
    ("self_attn.q_proj.bias", "self_attn.q_proj.bias", "NH->NH"),
    ("self_attn.k_proj.bias", "self_attn.k_proj.bias", "KH->KH"),
    ("self_attn.v_proj.bias", "self_attn.v_proj.bias", "KH->KH"),
]
_LAYER_O_BIAS = [("self_attn.o_proj.bias", "self_attn.o_proj.bias", "vector_D")]
_LAYER_QK_NORM = [
    ("self_attn.q_norm.weight", "self_attn.q_norm.weight", "vector_H"),
    ("self_attn.k_norm.weight", "self_attn.k_norm.weight", "vector_H"),
]
_LAYER_SANDWICH = [
    ("pre_feedforward_layernorm.weight", "pre_feedforward_layernorm.weight", "vector_D"),
    ("post_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "vector_D"),
]
# The family tables: which per-layer weights each family has (config flags add the optional ones).
FAMILY_LAYER_WEIGHTS = {
    "llama": _LAYER_COMMON,
    "mistral": _LAYER_COMMON,
    "qwen2": _LAYER_COMMON + _LAYER_QKV_BIAS,
    "qwen3": _LAYER_COMMON + _LAYER_QK_NORM,
    "gemma": _LAYER_COMMON,
    "gemma2": _LAYER_COMMON + _LAYER_SANDWICH,
}
_TOP = [
    ("embed_tokens.embedding", "model.embed_tokens.weight", "VxD->VD"),
    ("norm.weight", "model.norm.weight", "vector_D"),
]
_LM_HEAD = [("lm_head.kernel", "lm_head.weight", "VxD->DV")]


def _layout(c: ModelConfig, name: str):
    D, F, N, K, H, V = (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
    )
    return {
        "vector_D": (((D,),), (0,)),
        "vector_H": (((H,),), (0,)),
        "NHxD->DNH": (((N, H), (D,)), (2, 0, 1)),
        "KHxD->DKH": (((K, H), (D,)), (2, 0, 1)),
        "DxNH->NHD": (((D,), (N, H)), (1, 2, 0)),
        "FxD->DF": (((F,), (D,)), (1, 0)),
        "DxF->FD": (((D,), (F,)), (1, 0)),
        "NH->NH": (((N, H),), (0, 1)),
        "KH->KH": (((K, H),), (0, 1)),
        "VxD->VD": (((V,), (D,)), (0, 1)),
        "VxD->DV": (((V,), (D,)), (1, 0)),
    }[name]


def weight_table(c: ModelConfig) -> list[WeightSpec]:
    """Every parameter of a model with this config; per-layer entries carry "{i}" placeholders."""
    layer = list(FAMILY_LAYER_WEIGHTS[c.family])
    if c.qkv_bias and c.family != "qwen2":
        layer += _LAYER_QKV_BIAS
    if c.o_bias:
        layer += _LAYER_O_BIAS
    entries = [(m, h, lay) for m, h, lay in _TOP]
    entries += [(f"layers.{{i}}.{m}", f"model.layers.{{i}}.{h}", lay) for m, h, lay in layer]
    if not c.tie_word_embeddings:
        entries += _LM_HEAD
    return [WeightSpec(m, h, *_layout(c, lay)) for m, h, lay in entries]
