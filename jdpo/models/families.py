"""The HF weight-name tables: for one config, every model parameter with its HF name and the layout change.

Layouts: HF stores nn.Linear weights as [out, in]; the model keeps [in, out] with heads split out.
A layout is (groups, perm): reshape the HF tensor so HF dim i becomes the factors groups[i], then
transpose by perm to get the model's array. Export applies the inverse. phi3's fused weights are one
parameter each in the model too ([D, N + 2K, H] and [D, 2, F]), so a fused weight is one reshape and one
transpose like any other.
"""

import dataclasses
import math

from jdpo.models.config import FAMILIES, ModelConfig, ModelConfigError

__all__ = ["FAMILIES", "FAMILY_LAYER_WEIGHTS", "ModelConfigError", "WeightSpec", "weight_table"]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One model parameter: where it lives in the model, its HF name, and the layout change."""

    model_path: str  # dotted path in the model, "{i}" for the layer index
    hf_key: str  # HF tensor name, "{i}" for the layer index
    groups: tuple[tuple[int, ...], ...]  # HF dim i is reshaped into the factors groups[i]
    perm: tuple[int, ...]  # then transposed by perm into the model's layout
    # MoE experts: the model parameter stacks E such tensors on a leading [E] axis, "{j}" in hf_key the
    # expert's index; 0: one tensor
    experts: int = 0
    layers: tuple[int, ...] | None = None  # the layers that have it ("{i}" entries); None: every layer

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.groups)


# Per layer: (model path, HF name, layout). The layouts are resolved against the config's sizes below.
_INPUT_NORM = [("input_layernorm.weight", "input_layernorm.weight", "vector_D")]
_POST_ATTENTION_NORM = [("post_attention_layernorm.weight", "post_attention_layernorm.weight", "vector_D")]
_QKV = [
    ("self_attn.q_proj.kernel", "self_attn.q_proj.weight", "NHxD->DNH"),
    ("self_attn.k_proj.kernel", "self_attn.k_proj.weight", "KHxD->DKH"),
    ("self_attn.v_proj.kernel", "self_attn.v_proj.weight", "KHxD->DKH"),
]
_O = [("self_attn.o_proj.kernel", "self_attn.o_proj.weight", "DxNH->NHD")]
_GATE_UP = [
    ("mlp.gate_proj.kernel", "mlp.gate_proj.weight", "FxD->DF"),
    ("mlp.up_proj.kernel", "mlp.up_proj.weight", "FxD->DF"),
]
_DOWN = [("mlp.down_proj.kernel", "mlp.down_proj.weight", "DxF->FD")]
_LAYER_COMMON = _INPUT_NORM + _POST_ATTENTION_NORM + _QKV + _O + _GATE_UP + _DOWN
# phi3: q, k, v rows stacked in one [(N + 2K) H, D] weight, gate and up in one [2F, D] weight.
_LAYER_FUSED = (
    _INPUT_NORM
    + _POST_ATTENTION_NORM
    + _O
    + _DOWN
    + [
        ("self_attn.qkv_proj.kernel", "self_attn.qkv_proj.weight", "MHxD->DMH"),
        ("mlp.gate_up_proj.kernel", "mlp.gate_up_proj.weight", "2FxD->D2F"),
    ]
)
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
# olmo2/3: norms on the attention and MLP outputs only; q/k norms over the whole projection.
_LAYER_POST_NORM = (
    _POST_ATTENTION_NORM
    + _QKV
    + _O
    + _GATE_UP
    + _DOWN
    + [
        ("post_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "vector_D"),
        ("self_attn.q_norm.weight", "self_attn.q_norm.weight", "vector_NH"),
        ("self_attn.k_norm.weight", "self_attn.k_norm.weight", "vector_KH"),
    ]
)
# The family tables: which per-layer weights each family has (config flags add the optional ones).
FAMILY_LAYER_WEIGHTS = {
    "llama": _LAYER_COMMON,
    "mistral": _LAYER_COMMON,
    "qwen2": _LAYER_COMMON + _LAYER_QKV_BIAS,
    "qwen3": _LAYER_COMMON + _LAYER_QK_NORM,
    "gemma": _LAYER_COMMON,
    "gemma2": _LAYER_COMMON + _LAYER_SANDWICH,
    "gemma3_text": _LAYER_COMMON + _LAYER_SANDWICH + _LAYER_QK_NORM,
    "olmo2": _LAYER_POST_NORM,
    "olmo3": _LAYER_POST_NORM,
    "smollm3": _LAYER_COMMON,
    "phi3": _LAYER_FUSED,
}
# Mixture of experts (`jdpo.models.moe`): the router [E, D] and each expert's projections, stacked [E, ...]
# in the model. (model path, HF name, layout, stacked over the experts)
_ATTENTION_QK_NORM = _INPUT_NORM + _POST_ATTENTION_NORM + _QKV + _O + _LAYER_QK_NORM
_MOE_WEIGHTS = {
    "qwen3_moe": [
        ("mlp.router.kernel", "mlp.gate.weight", "ExD->DE", False),
        ("mlp.experts.gate_proj", "mlp.experts.{j}.gate_proj.weight", "FexD->DFe", True),
        ("mlp.experts.up_proj", "mlp.experts.{j}.up_proj.weight", "FexD->DFe", True),
        ("mlp.experts.down_proj", "mlp.experts.{j}.down_proj.weight", "DxFe->FeD", True),
    ],
    "mixtral": [
        ("mlp.router.kernel", "block_sparse_moe.gate.weight", "ExD->DE", False),
        ("mlp.experts.gate_proj", "block_sparse_moe.experts.{j}.w1.weight", "FexD->DFe", True),
        ("mlp.experts.up_proj", "block_sparse_moe.experts.{j}.w3.weight", "FexD->DFe", True),
        ("mlp.experts.down_proj", "block_sparse_moe.experts.{j}.w2.weight", "DxFe->FeD", True),
    ],
    # one [E, D, 2F] tensor per projection (gate and up interleaved), with biases
    "gpt_oss": [
        ("mlp.router.kernel", "mlp.router.weight", "ExD->DE", False),
        ("mlp.router.bias", "mlp.router.bias", "vector_E", False),
        ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj", "ExDx2Fe->EDFe2", False),
        ("mlp.experts.gate_up_proj_bias", "mlp.experts.gate_up_proj_bias", "Ex2Fe->EFe2", False),
        ("mlp.experts.down_proj", "mlp.experts.down_proj", "ExFexD->EFeD", False),
        ("mlp.experts.down_proj_bias", "mlp.experts.down_proj_bias", "ExD->ED", False),
    ],
}
_MOE_ATTENTION = {
    "qwen3_moe": _ATTENTION_QK_NORM,
    "mixtral": _INPUT_NORM + _POST_ATTENTION_NORM + _QKV + _O,
    "gpt_oss": _INPUT_NORM
    + _POST_ATTENTION_NORM
    + _QKV
    + _O
    + [("self_attn.sinks", "self_attn.sinks", "vector_N")],
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
        "vector_NH": (((N * H,),), (0,)),
        "vector_KH": (((K * H,),), (0,)),
        "MHxD->DMH": (((N + 2 * K, H), (D,)), (2, 0, 1)),
        "2FxD->D2F": (((2, F), (D,)), (2, 0, 1)),
        "NHxD->DNH": (((N, H), (D,)), (2, 0, 1)),
        "KHxD->DKH": (((K, H), (D,)), (2, 0, 1)),
        "DxNH->NHD": (((D,), (N, H)), (1, 2, 0)),
        "FxD->DF": (((F,), (D,)), (1, 0)),
        "DxF->FD": (((D,), (F,)), (1, 0)),
        "NH->NH": (((N, H),), (0, 1)),
        "KH->KH": (((K, H),), (0, 1)),
        "VxD->VD": (((V,), (D,)), (0, 1)),
        "VxD->DV": (((V,), (D,)), (1, 0)),
        "ExD->DE": (((c.num_experts,), (D,)), (1, 0)),
        "FexD->DFe": (((c.moe_intermediate_size,), (D,)), (1, 0)),
        "DxFe->FeD": (((D,), (c.moe_intermediate_size,)), (1, 0)),
        "vector_E": (((c.num_experts,),), (0,)),
        "vector_N": (((N,),), (0,)),
        "ExDx2Fe->EDFe2": (((c.num_experts,), (D,), (c.moe_intermediate_size, 2)), (0, 1, 2, 3)),
        "Ex2Fe->EFe2": (((c.num_experts,), (c.moe_intermediate_size, 2)), (0, 1, 2)),
        "ExFexD->EFeD": (((c.num_experts,), (c.moe_intermediate_size,), (D,)), (0, 1, 2)),
        "ExD->ED": (((c.num_experts,), (D,)), (0, 1)),
    }[name]


def _moe_table(c: ModelConfig) -> list[WeightSpec]:
    """The per-layer entries of an MoE family: attention and norms on every layer, the router and the
    experts on the MoE layers, the gated MLP on the others (qwen3_moe's mlp_only_layers)."""
    experts = [i for i, moe in enumerate(c.expert_layers) if moe]
    dense = [i for i, moe in enumerate(c.expert_layers) if not moe]
    out = [(m, h, lay, 0, None) for m, h, lay in _MOE_ATTENTION[c.family]]
    out += [
        (m, h, lay, c.num_experts if stacked else 0, tuple(experts))
        for m, h, lay, stacked in _MOE_WEIGHTS[c.family]
    ]
    if dense:
        out += [(m, h, lay, 0, tuple(dense)) for m, h, lay in _GATE_UP + _DOWN]
    if c.qkv_bias:
        out += [(m, h, lay, 0, None) for m, h, lay in _LAYER_QKV_BIAS]
    if c.o_bias:
        out += [(m, h, lay, 0, None) for m, h, lay in _LAYER_O_BIAS]
    return [
        WeightSpec(f"layers.{{i}}.{m}", f"model.layers.{{i}}.{h}", *_layout(c, lay), experts=e,
                   layers=None if layers is not None and len(layers) == c.num_layers else layers)
        for m, h, lay, e, layers in out
    ]  # fmt: skip


def weight_table(c: ModelConfig) -> list[WeightSpec]:
    """Every parameter of a model with this config; per-layer entries carry "{i}" placeholders (and MoE
    experts' "{j}")."""
    if c.family in _MOE_WEIGHTS:
        top = [
            WeightSpec(m, h, *_layout(c, lay))
            for m, h, lay in _TOP + ([] if c.tie_word_embeddings else _LM_HEAD)
        ]
        return top[:2] + _moe_table(c) + top[2:]
    layer = list(FAMILY_LAYER_WEIGHTS[c.family])
    if c.qkv_bias and c.family != "qwen2":  # (phi3 and the gemmas refuse attention_bias at load)
        layer += _LAYER_QKV_BIAS
    if c.o_bias:
        layer += _LAYER_O_BIAS
    entries = [(m, h, lay) for m, h, lay in _TOP]
    entries += [(f"layers.{{i}}.{m}", f"model.layers.{{i}}.{h}", lay) for m, h, lay in layer]
    if not c.tie_word_embeddings:
        entries += _LM_HEAD
    return [WeightSpec(m, h, *_layout(c, lay)) for m, h, lay in entries]
