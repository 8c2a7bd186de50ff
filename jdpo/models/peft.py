"""LoRA adapters in PEFT's directory format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a LoRA weight by the Hugging Face module it adapts, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
in torch's (out, in) convention with the update (lora_alpha / r) * B @ A. jdpo's A [*in, r] and B [r, *out]
(per-head shapes) are the same numbers transposed: every family's projections flatten their head axes in
HF's row-major order (`jdpo.models.families`: the q / k / v / o layouts are reshapes and transposes only),
so the mapping is one transpose and one reshape for every family. phi3's fused projections are adapted
as PEFT adapts them, as one module each: `...self_attn.qkv_proj.lora_B.weight` [(N + 2K) H, r] (q, k, v
rows in HF's order) and `...mlp.gate_up_proj.lora_B.weight` [2F, r], one A each.

An MoE model's per-expert adapters (`lora.targets` experts.gate_up_proj / experts.down_proj) are PEFT's
`target_parameters` on transformers 5's fused 3-D expert parameters (`mlp.experts.gate_up_proj`
[E, 2F, D], gpt_oss [E, D, 2F] gate / up interleaved; `mlp.experts.down_proj`), PEFT's `ParamWrapper`:
`lora_A.weight` [r E, in] (expert e's A_e [r, in] in rows e r .. e r + r - 1) and `lora_B.weight`
[out, r E] (B_e [out, r] in columns j E + e: rank-major), the update (lora_alpha / r) B_e A_e per expert.
Both parameters of one experts module nest two wrappers: gate_up_proj's (the parameter transformers
registers first) is the inner one, `...mlp.experts.base_layer.lora_A.weight`, down_proj's the outer,
`...mlp.experts.lora_A.weight`; a single adapted parameter is `...mlp.experts.lora_A.weight`.

    save_adapter(model, "runs/x/final", base_model="path/to/base")   # only process 0 writes
    check_adapter("sft_adapter", model_config, spec)                  # before any weight loads
    load_adapter(model, "sft_adapter")                               # into the model's adapters
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jdpo.errors import ConfigError
from jdpo.models.adapter_files import ADAPTER_CONFIG, read_adapter_config, record_base, verified_base
from jdpo.models.adapters import (
    BLOCK,
    adapter_spec,
    expert_shapes,
    merged,
    model_targets,
    projection_shapes,
)
from jdpo.models.choices import EXPERT_TARGETS
from jdpo.models.config import ModelConfig
from jdpo.models.hf import CheckpointError, from_pretrained, host_array
from jdpo.models.layers import Dense
from jdpo.models.moe import Experts
from jdpo.models.options import PROJECTIONS, LoRASpec, ModelOptions
from jdpo.models.transformer import Transformer

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "check_adapter",
    "from_adapter_dir",
    "is_adapter_dir",
    "load_adapter",
    "save_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _entries(config: ModelConfig, targets) -> list[tuple[int, str, str]]:
    """(layer, target, PEFT module key prefix) of every adapted projection, in layer order; an MoE
    layer's expert adapters after its projections' (gate_up_proj's inner wrapper under base_layer when
    down_proj is adapted too)."""
    experts = [t for t in EXPERT_TARGETS if t in targets]
    out = []
    for i in range(config.num_layers):
        out += [(i, t, f"base_model.model.model.layers.{i}.{BLOCK[t]}.{t}")
                for t in sorted(targets) if t not in EXPERT_TARGETS]  # fmt: skip
        if config.num_experts and config.expert_layers[i]:
            for t in experts:
                inner = ".base_layer" if len(experts) > 1 and t == EXPERT_TARGETS[0] else ""
                out.append((i, t, f"base_model.model.model.layers.{i}.mlp.experts{inner}"))
    return out


def _expected_shapes(config: ModelConfig, rank: int, targets) -> dict[str, tuple[int, int]]:
    shapes = {**projection_shapes(config), **expert_shapes(config)}
    out = {}
    for _, t, prefix in _entries(config, targets):
        n_in, n_out = (math.prod(s) for s in shapes[t])
        E = config.num_experts if t in EXPERT_TARGETS else 1
        out[f"{prefix}.lora_A.weight"] = (rank * E, n_in)
        out[f"{prefix}.lora_B.weight"] = (n_out, rank * E)
    return out


def _target_parameters(cfg: dict, where: str) -> list[str]:
    """adapter_config.json's target_parameters as jdpo's expert targets (mlp.experts.gate_up_proj ->
    experts.gate_up_proj); ConfigError naming one that is not an MoE expert projection."""
    names = cfg.get("target_parameters") or []
    names = [names] if isinstance(names, str) else names
    out = []
    for name in names:
        hit = [t for t in EXPERT_TARGETS if isinstance(name, str) and (name == t or name.endswith("." + t))]
        if not hit:
            raise ConfigError(
                f"{where}: target_parameters {name!r} is not an MoE expert parameter jdpo adapts "
                f"({', '.join('mlp.' + t for t in EXPERT_TARGETS)})"
            )
        out.append(hit[0])
    return out


def _targets(cfg: dict, where: str) -> list[str]:
    targets = cfg.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return targets + _target_parameters(cfg, where)


def _read_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise ConfigError(f"lora.init_adapter: {adapter_dir} is not a PEFT adapter directory (no {path})")
    return read_adapter_config(adapter_dir)


def check_adapter(adapter_dir: str, config: ModelConfig, spec: LoRASpec) -> None:
    """Refuse (ConfigError naming the field or the tensor) a PEFT adapter that does not fit this model and
    the run's adapters (`spec`, from the `lora` settings): its rank, alpha and targets must be the run's,
    and its tensors exactly the model's adapters with their shapes. Reads adapter_config.json and the
    safetensors header only."""
    cfg = _read_config(adapter_dir)
    where = f"lora.init_adapter {adapter_dir}"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where} is a {cfg.get('peft_type')} adapter, not LoRA")
    for key, bad in [("use_rslora", True), ("use_dora", True)]:
        if cfg.get(key) is bad:
            raise ConfigError(f"{where}: {key}=true adapters are not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none" or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConfigError(f"{where}: bias training or per-module rank / alpha patterns are not supported")
    targets = _targets(cfg, where)
    theirs_targets = list(model_targets(targets, config, field=f"{where}: target_modules"))
    for field, theirs, ours in [
        ("lora.rank", cfg.get("r"), spec.rank),
        ("lora.alpha", float(cfg.get("lora_alpha", 8)), float(spec.alpha)),
        ("lora.targets", theirs_targets, list(spec.targets)),
    ]:
        if theirs != ours:
            name = field.split(".")[1]
            raise ConfigError(f"{where} has {name} {theirs!r} but {field} is {ours!r}: set {field}")
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        raise ConfigError(f"{where}: no {ADAPTER_WEIGHTS}")
    want = _expected_shapes(config, spec.rank, spec.targets)
    with safe_open(path, framework="numpy") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in want.items():
        if key not in have:
            raise ConfigError(f"{where}: tensor {key} is missing from {ADAPTER_WEIGHTS} (the adapter's "
                              "base has another architecture or layer count)")  # fmt: skip
        if have[key] != shape:
            raise ConfigError(f"{where}: tensor {key} has shape {have[key]}, the model's is {shape} "
                              "(the adapter was trained on another base)")  # fmt: skip
    extra = sorted(set(have) - set(want))
    if extra:
        raise ConfigError(
            f"{where}: tensor {extra[0]} (and {len(extra) - 1} more) adapts nothing in the model"
        )


def is_adapter_dir(path) -> bool:
    """Is `path` a PEFT adapter directory (rather than a full checkpoint)?"""
    return os.path.exists(os.path.join(os.fspath(path), ADAPTER_CONFIG))


def from_adapter_dir(path, *, options=None, mesh=None) -> tuple[Transformer, str]:
    """The model of a PEFT adapter directory: its base (`base_model_name_or_path`, a local checkpoint)
    with the adapter merged into the kernels. Returns (model, base path). What `jdpo eval` and
    `jdpo generate` load when given an adapter directory."""
    path = os.fspath(path)
    cfg = _read_config(path)
    base = verified_base(path, cfg)
    targets = tuple(_targets(cfg, path))
    unknown = [t for t in targets if t not in PROJECTIONS + EXPERT_TARGETS]
    if unknown:
        raise ConfigError(f"{path}: target_modules {unknown} are not among {', '.join(PROJECTIONS)}")
    config = ModelConfig.from_hf(base)
    spec = adapter_spec(config, rank=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                        targets=targets, where=base)  # fmt: skip
    check_adapter(path, config, spec)
    options = dataclasses.replace(ModelOptions() if options is None else options, lora=spec)
    model, _ = from_pretrained(base, options=options, mesh=mesh)
    load_adapter(model, path)
    return merged(model), base


def _adapter_vars(model: Transformer):
    """(layer, target) -> (A variable, B variable, stacked layer index or None, PEFT key prefix)."""
    modules = {".".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, Dense | Experts)}
    out = {}
    for i, t, prefix in _entries(model.config, model.options.lora.targets):
        block, name = ("mlp", t) if t in EXPERT_TARGETS else (BLOCK[t], t)
        module, attr = name.rsplit(".", 1) if "." in name else (name, None)
        if model.options.scan_layers:
            m, idx = modules[f"layers.{block}.{module}"], i
        else:
            m, idx = modules[f"layers.{i}.{block}.{module}"], None
        if attr is None:
            out[i, t] = (m.lora_a, m.lora_b, idx, prefix)
        else:
            out[i, t] = (getattr(m, f"{attr}_lora_a"), getattr(m, f"{attr}_lora_b"), idx, prefix)
    return out


def _from_peft(t: str, a, b, a_shape, b_shape):
    """PEFT's lora_A [r E, in] / lora_B [out, r E] (E = 1 for a projection) -> jdpo's A [(E,) *in, r] and
    B [(E,) r, *out]."""
    if t not in EXPERT_TARGETS:
        return a.T.reshape(a_shape), b.T.reshape(b_shape)
    E, r = a_shape[0], a_shape[-1]
    a = a.reshape(E, r, -1).transpose(0, 2, 1)  # expert-major rows -> [E, in, r]
    b = b.reshape(b.shape[0], r, E).transpose(2, 1, 0)  # rank-major columns -> [E, r, out]
    return a.reshape(a_shape), b.reshape(b_shape)


def _to_peft(t: str, a, b):
    """The inverse of `_from_peft`."""
    if t not in EXPERT_TARGETS:
        r = a.shape[-1]
        return a.reshape(-1, r).T, b.reshape(r, -1).T
    E, r = a.shape[0], a.shape[-1]
    a = a.reshape(E, -1, r).transpose(0, 2, 1).reshape(E * r, -1)
    b = b.reshape(E, r, -1).transpose(2, 1, 0).reshape(-1, r * E)
    return a, b


def load_adapter(model: Transformer, adapter_dir: str) -> None:
    """Set the model's adapters (built with `ModelOptions.lora`) to a PEFT adapter's weights, in the
    adapters' dtypes and shardings. Call `check_adapter` first for a message naming what does not fit."""
    tensors = {}
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:  # else it would surface as a non-finite loss at step 1, or as garbage samples
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{path}: tensor {bad[0]} holds NaN or inf values{more}: the adapter is damaged or comes "
            "from a diverged run; use another adapter or re-export it"
        )
    stacked: dict[int, list] = {}
    for (_, t), (a_var, b_var, idx, prefix) in _adapter_vars(model).items():
        a_shape = a_var.get_value().shape[1 if idx is not None else 0 :]
        b_shape = b_var.get_value().shape[1 if idx is not None else 0 :]
        a, b = _from_peft(
            t, tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"], a_shape, b_shape
        )
        for var, value in ((a_var, a), (b_var, b)):
            if idx is None:
                _set(var, value)
            else:
                stacked.setdefault(id(var), [var, []])[1].append(value)
    for var, values in stacked.values():
        _set(var, np.stack(values))


def _set(var, value: np.ndarray) -> None:
    old = var.get_value()
    var.set_value(jax.device_put(np.asarray(value, dtype=old.dtype), old.sharding))


def save_adapter(model: Transformer, out_dir, *, base_model: str) -> None:
    """Write the model's adapters as a PEFT adapter directory that `peft.PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(base_model), out_dir)` loads. Every process takes part in
    gathering the shards; only process 0 writes."""
    spec = model.options.lora
    weights = {}
    for (_, t), (a_var, b_var, idx, prefix) in _adapter_vars(model).items():
        a, b = host_array(a_var.get_value()), host_array(b_var.get_value())
        if idx is not None:
            a, b = a[idx], b[idx]
        a, b = _to_peft(t, a, b)
        weights[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
        weights[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
    if jax.process_index() != 0:
        return
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        **record_base(base_model),  # the absolute path and the fingerprint of a local base
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(t for t in spec.targets if t not in EXPERT_TARGETS),
        # PEFT's ParamWrapper on transformers' fused 3-D expert parameters
        **({"target_parameters": [f"mlp.{t}" for t in spec.expert_targets]} if spec.expert_targets else {}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    if spec.quantize != "none":
        _write_qlora_card(out_dir, spec.quantize)


def qlora_note(quantize: str, name: str) -> str:
    """What a QLoRA adapter's card says: it was trained on the quantised base, so on the full-precision
    one it is not quite the model that was trained; `<name>_merged/` is."""
    return (
        f"# LoRA adapter trained on the base quantised to {quantize} (QLoRA)\n\n"
        "The adapter learned to correct the quantised base. Applied to the full-precision base "
        "(`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_dir)`), "
        "its logits differ from the trained model's by the quantisation error (up to about 0.2 with "
        f"nf4 on jdpo's test model). The model as trained is `{name}_merged/` beside this directory: "
        "the dequantised base with the adapter merged in; use it where exact outputs matter.\n"
    )


def _write_qlora_card(out_dir: str, quantize: str) -> None:
    """README.md of a QLoRA adapter (`qlora_note`); a run's export replaces it by its model card, which
    holds the note."""
    name = os.path.basename(os.path.normpath(out_dir))
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(qlora_note(quantize, name))
