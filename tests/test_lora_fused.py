"""LoRA on phi3's fused projections (jdpo.models.adapters, jdpo.models.peft): one adapter per fused module,
named as PEFT names it (`qkv_proj`, `gate_up_proj`), loaded by `peft` to jdpo's logits; the targets of a
run resolve to the model's projections; a quantised (QLoRA) fused base stays close to the float one."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpo.errors import ConfigError
from jdpo.models import ModelConfig, ModelOptions, from_pretrained
from jdpo.models.adapters import adapter_spec, dense_modules, merged, model_targets
from jdpo.models.choices import LORA_TARGETS
from jdpo.models.peft import check_adapter, from_adapter_dir, load_adapter, save_adapter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 96
PHI3 = dict(
    vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
IDS = np.random.RandomState(0).randint(3, V, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A tiny phi3 checkpoint with every weight moved off its initial value."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("phi3", **PHI3)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("phi3")
    model.save_pretrained(path)
    return path


def _adapted(path, *, scan_layers=False, quantize="none", seed=1):
    """phi3 with adapters on every projection, A and B both random (B = 0 would hide a wrong B layout)."""
    config = ModelConfig.from_hf(path)
    spec = adapter_spec(config, rank=4, alpha=8.0, targets=LORA_TARGETS, quantize=quantize, where=str(path))
    model, _ = from_pretrained(path, options=ModelOptions(scan_layers=scan_layers, lora=spec))
    rng = np.random.RandomState(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            x = var.get_value()
            var.set_value(jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype))
    return model, spec


def test_the_default_targets_resolve_to_the_fused_projections(phi3_dir):
    phi3 = ModelConfig.from_hf(phi3_dir)
    assert model_targets(LORA_TARGETS, phi3) == ("o_proj", "down_proj", "qkv_proj", "gate_up_proj")
    assert model_targets(("gate_up_proj",), phi3) == ("gate_up_proj",)
    llama = ModelConfig.from_hf({**PHI3, "model_type": "llama"})
    assert model_targets(("qkv_proj",), llama) == ("q_proj", "k_proj", "v_proj")
    with pytest.raises(ConfigError, match="phi3 fuses q_proj, k_proj, v_proj into one qkv_proj"):
        model_targets(("q_proj", "v_proj"), phi3)
    with pytest.raises(ConfigError, match="'w_proj' is not a projection of the model"):
        model_targets(("w_proj",), phi3)


# loop is slow (11 s): the scanned stack loads the same PEFT adapters
@pytest.mark.parametrize(
    "scan_layers", [pytest.param(False, marks=pytest.mark.slow), True], ids=["loop", "scan"]
)
def test_peft_loads_the_fused_adapters_to_jdpos_logits(phi3_dir, tmp_path, scan_layers):
    peft = pytest.importorskip("peft")
    model, spec = _adapted(phi3_dir, scan_layers=scan_layers)
    want = np.asarray(model(jnp.asarray(IDS)))
    save_adapter(model, tmp_path, base_model=str(phi3_dir))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # PEFT's names and shapes for the fused modules: B [(N + 2K) H, r] and [2F, r], one A [r, D] each
    assert tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight"].shape == (96, 4)
    assert tensors["base_model.model.model.layers.1.mlp.gate_up_proj.lora_A.weight"].shape == (4, 32)
    base = transformers.AutoModelForCausalLM.from_pretrained(phi3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
        got = adapted(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    assert np.abs(plain - want).max() > 1e-2  # the adapters change the logits
    diff = float(np.abs(got - want).max())
    print(f"phi3 LoRA ({'scan' if scan_layers else 'loop'}) vs peft: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    # and back: the adapter checks against the model, loads into a fresh one, merges to the same logits
    check_adapter(str(tmp_path), ModelConfig.from_hf(phi3_dir), spec)
    fresh, _ = _adapted(phi3_dir, scan_layers=not scan_layers, seed=7)
    load_adapter(fresh, str(tmp_path))
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(IDS))), want, atol=1e-5)
    again, base_path = from_adapter_dir(tmp_path)
    assert base_path == str(phi3_dir)
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(IDS))), want, atol=1e-5)


def test_an_adapter_of_other_targets_is_refused(phi3_dir, tmp_path):
    model, _ = _adapted(phi3_dir)
    save_adapter(model, tmp_path, base_model=str(phi3_dir))
    config = ModelConfig.from_hf(phi3_dir)
    attention_only = adapter_spec(config, rank=4, alpha=8.0, targets=("qkv_proj", "o_proj"))
    with pytest.raises(ConfigError, match="has targets .* but lora.targets is"):
        check_adapter(str(tmp_path), config, attention_only)


# nf4 is slow (11 s): int8 runs the same fused quantised path; nf4's codes are tests/test_quantize.py's
@pytest.mark.parametrize("kind,tolerance", [("int8", 0.05), pytest.param("nf4", 0.3, marks=pytest.mark.slow)])
def test_a_quantised_fused_base_is_close_and_merges_to_itself(phi3_dir, kind, tolerance):
    full, _ = _adapted(phi3_dir)
    quantised, _ = _adapted(phi3_dir, quantize=kind)
    projections = dense_modules(quantised, adapted=False)
    fused = [m for p, m in projections.items() if p[-1] in ("qkv_proj", "gate_up_proj")]
    assert fused and all(m.quantize == kind for m in fused)
    want, got = np.asarray(full(jnp.asarray(IDS))), np.asarray(quantised(jnp.asarray(IDS)))
    assert 0 < np.abs(got - want).max() < tolerance
    # merging adds (alpha / r) A B to the dequantised kernels: the same function in float
    np.testing.assert_allclose(np.asarray(merged(quantised)(jnp.asarray(IDS))), got, atol=1e-4)
