"""LoRA on the experts of MoE models (issue 29): `lora.targets` experts.gate_up_proj / experts.down_proj
give one adapter per expert, in PEFT's `target_parameters` layout. jdpo's adapted logits equal
`PeftModel.from_pretrained` on the exported adapter (qwen3_moe, mixtral, gpt_oss, float32, adapters
moved off zero), the ragged, dense and expert-sharded dispatches agree, gradients reach the expert
adapters, and the merged model computes the same function."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import adapter_gradients  # noqa: E402
from test_models_moe import saved_moe_checkpoint  # noqa: E402

from jdpo.errors import ConfigError  # noqa: E402
from jdpo.models import ModelConfig, ModelOptions, from_pretrained  # noqa: E402
from jdpo.models.adapters import adapter_spec, merged, model_targets  # noqa: E402
from jdpo.models.choices import EXPERT_TARGETS, LORA_TARGETS  # noqa: E402
from jdpo.models.peft import check_adapter, from_adapter_dir, load_adapter, save_adapter  # noqa: E402
from jdpo.parallel.sharding import make_mesh  # noqa: E402

B, T, V = 2, 12, 96
LENGTHS = (12, 7)
CASES = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.5)),
}
ATTENTION_AND_EXPERTS = ("q_proj", "v_proj", *EXPERT_TARGETS)
IDS = np.random.RandomState(0).randint(0, V, (B, T)).astype(np.int32)
MASK = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)


@pytest.fixture(scope="module", params=list(CASES))
def moe_dir(request, tmp_path_factory):
    return saved_moe_checkpoint(tmp_path_factory, request.param, *CASES[request.param])


def _adapted(path, *, targets=ATTENTION_AND_EXPERTS, scan_layers=False, dispatch="ragged", mesh=None, seed=1):
    """The model with adapters on `targets`, A and B random (B = 0 would hide a wrong B layout)."""
    config = ModelConfig.from_hf(path)
    spec = adapter_spec(config, rank=2, alpha=6.0, targets=targets, where=str(path))
    options = ModelOptions(scan_layers=scan_layers, lora=spec, moe_dispatch=dispatch)
    model, _ = from_pretrained(path, options=options, mesh=mesh)
    rng = np.random.RandomState(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            x = var.get_value()
            var.set_value(
                jax.device_put(jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), x.sharding)
            )
    return model, spec


def _logits(model):
    return np.asarray(model(jnp.asarray(IDS), segment_ids_BxT=jnp.asarray(MASK)))


def _hf_logits(model):
    with torch.no_grad():
        out = model(
            torch.from_numpy(IDS.astype(np.int64)), attention_mask=torch.from_numpy(MASK.astype(np.int64))
        )
    return out.logits.numpy()


def _real(x):
    return x * MASK[..., None]  # right-padded positions differ by the mask convention only


def test_peft_loads_the_expert_adapters_to_jdpos_logits(moe_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = _adapted(moe_dir)
    want = _logits(model)
    save_adapter(model, tmp_path, base_model=str(moe_dir))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    plain = _hf_logits(base)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    got = _hf_logits(adapted)
    assert np.abs(_real(plain - want)).max() > 1e-2  # the adapters change the logits
    diff = float(np.abs(_real(got - want)).max())
    print(f"{moe_dir.name} expert LoRA vs peft: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    # peft's merge of the same adapter equals jdpo's merged export
    jdpo_merged = _logits(merged(model))
    peft_merged = _hf_logits(adapted.merge_and_unload())
    merge_diff = float(np.abs(_real(peft_merged - jdpo_merged)).max())
    print(f"{moe_dir.name} merged: max |logit diff| vs peft's merge = {merge_diff:.2e}")
    assert merge_diff < 1e-4
    np.testing.assert_allclose(_real(jdpo_merged), _real(want), atol=1e-4)


def test_the_export_checks_and_reloads_into_jdpo(moe_dir, tmp_path):
    """Back: the exported adapter is checked against the model, loads into a fresh scanned model, and
    `jdpo eval` / `jdpo generate`'s adapter-directory path merges it to the same logits."""
    model, spec = _adapted(moe_dir)
    want = _logits(model)
    save_adapter(model, tmp_path, base_model=str(moe_dir))
    check_adapter(str(tmp_path), ModelConfig.from_hf(moe_dir), spec)
    fresh, _ = _adapted(moe_dir, scan_layers=True, seed=7)
    load_adapter(fresh, str(tmp_path))
    np.testing.assert_allclose(_real(_logits(fresh)), _real(want), atol=1e-5)
    again, _ = from_adapter_dir(tmp_path)
    np.testing.assert_allclose(_real(_logits(again)), _real(want), atol=1e-4)
    attention = adapter_spec(ModelConfig.from_hf(moe_dir), rank=2, alpha=6.0, targets=("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="has targets .* but lora.targets is"):
        check_adapter(str(tmp_path), ModelConfig.from_hf(moe_dir), attention)


def test_one_expert_parameter_alone_has_peft_s_unnested_keys(moe_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = _adapted(moe_dir, targets=("experts.down_proj",))
    save_adapter(model, tmp_path, base_model=str(moe_dir))
    from safetensors.numpy import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.weight" in keys and len(keys) == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    got = _hf_logits(peft.PeftModel.from_pretrained(base, str(tmp_path)).eval())
    assert np.abs(_real(got - _logits(model))).max() < 1e-4


def test_an_adapter_peft_wrote_loads_into_jdpo(moe_dir, tmp_path):
    """The other direction: PEFT's own adapter (random A and B, target_parameters listed down_proj first)
    as lora.init_adapter / an adapter directory gives PEFT's logits."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    config = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
    )  # fmt: skip
    adapted = peft.get_peft_model(base, config).eval()
    want = _hf_logits(adapted)
    adapted.save_pretrained(tmp_path)
    spec = adapter_spec(ModelConfig.from_hf(moe_dir), rank=2, alpha=6.0, targets=ATTENTION_AND_EXPERTS)
    check_adapter(str(tmp_path), ModelConfig.from_hf(moe_dir), spec)
    model, _ = from_pretrained(moe_dir, options=ModelOptions(lora=spec))
    load_adapter(model, str(tmp_path))
    diff = float(np.abs(_real(_logits(model) - want)).max())
    print(f"{moe_dir.name} peft's own adapter in jdpo: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_dispatches_agree_and_gradients_reach_only_the_adapters(moe_dir):
    ragged, _ = _adapted(moe_dir)
    dense, _ = _adapted(moe_dir, dispatch="dense")
    np.testing.assert_allclose(_logits(ragged), _logits(dense), atol=1e-5)

    g_adapters, base = adapter_gradients(ragged, IDS, MASK)
    experts = g_adapters["layers"][0]["mlp"]["experts"]
    for name in ("gate_up_proj_lora_a", "gate_up_proj_lora_b", "down_proj_lora_a", "down_proj_lora_b"):
        g = np.asarray(experts[name].get_value())
        assert np.abs(g).max() > 0, name
        # each expert that took a token gets its own gradient
        assert (np.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0).sum() >= 2, name
    # the experts' kernels are the frozen base's, not among what the step differentiates
    names = ("gate_up_proj", "down_proj") if "gate_up_proj" in base["layers"][0]["mlp"]["experts"] else (
        "gate_proj", "up_proj", "down_proj")  # fmt: skip
    assert all(n in base["layers"][0]["mlp"]["experts"] and n not in experts for n in names)
    assert all(not isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(base))


def test_expert_sharded_adapters_match_one_device(moe_dir):
    """The expert-parallel dispatch (experts and their adapters over mesh.expert) computes the same logits."""
    E = ModelConfig.from_hf(moe_dir).num_experts
    X = 2 if E % 4 else 4
    want = _logits(_adapted(moe_dir)[0])
    mesh = make_mesh(8 // X, 1, 1, expert=X)
    sharded, _ = _adapted(moe_dir, mesh=mesh)
    a = sharded.layers[0].mlp.experts.down_proj_lora_a.get_value()
    assert a.sharding.shard_shape(a.shape)[0] == E // X
    ids, mask = np.tile(IDS, (4, 1)), np.tile(MASK, (4, 1))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda i, s: sharded(i, segment_ids_BxT=s))(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[:B], want, atol=1e-5)


def test_expert_targets_resolve_and_refuse():
    moe = ModelConfig.from_hf({**dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8),
                               "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 16})  # fmt: skip
    assert model_targets(LORA_TARGETS, moe) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert model_targets(("experts.down_proj", "o_proj"), moe) == ("o_proj", "experts.down_proj")
    with pytest.raises(
        ConfigError, match="'up_proj' on qwen3_moe is an MoE layer's experts'.*experts.gate_up_proj"
    ):
        model_targets(("q_proj", "up_proj"), moe)
    with pytest.raises(
        ConfigError, match="lora.dropout=0.1 with lora.targets experts.gate_up_proj.*no dropout"
    ):
        adapter_spec(moe, rank=2, alpha=4.0, targets=("experts.gate_up_proj",), dropout=0.1)
    with pytest.raises(
        ConfigError, match=r"lora.rank=17 is larger than experts.down_proj's dimensions \(16 in"
    ):
        adapter_spec(moe, rank=17, alpha=4.0, targets=("experts.down_proj",))
    llama = ModelConfig.from_hf(
        {
            **dict(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
            "model_type": "llama",
        }
    )
    with pytest.raises(
        ConfigError, match="'experts.down_proj' adapts an MoE layer's experts, and llama has none"
    ):
        model_targets(("experts.down_proj",), llama)
