"""The 2025-26 families (issue 28: gemma3_text, olmo2, olmo3, smollm3, phi3) beyond logit parity: what their
config.json readers default to and refuse (naming the field), real-size parameter counts against
transformers' own, every attention kernel on packed rows (per-layer windows and RoPE kinds traced under the
layer scan), and the shared-prompt rule for sliding layers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_hf_config
from helpers_attention import packed_segments, segment_positions

from jdpo.errors import ConfigError
from jdpo.models import ModelConfig, ModelOptions, Transformer
from jdpo.models.config import FAMILIES, ModelConfigError
from jdpo.models.kernels import resolve_attention, shares_prompt

NEW = ("gemma3_text", "olmo2", "olmo3", "smollm3", "phi3")
SIZES = dict(vocab_size=64, intermediate_size=48, num_hidden_layers=3)
_ROPES = {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}
TINY = {
    "gemma3_text": tiny_hf_config(
        "gemma2", model_type="gemma3_text", sliding_window=5, final_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters=_ROPES,
        **SIZES,
    ),
    "olmo2": tiny_hf_config("llama", model_type="olmo2", **SIZES),
    "olmo3": tiny_hf_config(
        "llama", model_type="olmo3", sliding_window=5, rope_parameters=_ROPES,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **SIZES,
    ),
    "smollm3": tiny_hf_config("llama", model_type="smollm3", no_rope_layers=[1, 0, 1], **SIZES),
    "phi3": tiny_hf_config("llama", model_type="phi3", sliding_window=6, **SIZES),
}  # fmt: skip


def test_defaults_follow_transformers():
    """Layer patterns and RoPE bases a config.json may leave out are transformers' defaults."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, head_dim=8)
    gemma3 = ModelConfig.from_hf(dict(base, model_type="gemma3_text", num_hidden_layers=7, sliding_window=8))
    assert gemma3.sliding_layers == (True,) * 5 + (False, True)  # five local layers per global one
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1e6, 1e4)
    assert gemma3.layer_rope == (1,) * 5 + (0, 1) and gemma3.tie_word_embeddings and gemma3.qk_norm
    olmo3 = ModelConfig.from_hf(dict(base, model_type="olmo3", num_hidden_layers=4))
    assert olmo3.sliding_layers == (True, True, True, False) and olmo3.sliding_window == 4096
    assert olmo3.local_rope_theta is None and olmo3.rope_theta == 5e5  # one base: one RoPE table
    assert olmo3.post_norm and olmo3.qk_norm_scope == "projection"
    smollm3 = ModelConfig.from_hf(dict(base, model_type="smollm3", num_hidden_layers=8))
    assert smollm3.layer_rope == (0, 0, 0, 2) * 2 and smollm3.rope_theta == 2e6  # every 4th layer NoPE
    phi3 = ModelConfig.from_hf(dict(base, model_type="phi3", num_hidden_layers=2, sliding_window=16))
    assert phi3.fused_projections and phi3.sliding_layers == (True, True)


@pytest.mark.parametrize("family", NEW)
def test_config_round_trips(family):
    config = ModelConfig.from_hf(TINY[family])
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    "family,change,message",
    [
        ("phi3", dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.75}),
         "rope_parameters.partial_rotary_factor=0.75 is not supported"),
        ("olmo3", dict(rope_parameters={**_ROPES, "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 1e4}}),
         "rope_parameters.sliding_attention.rope_type='linear': only default"),
        ("olmo3", dict(rope_parameters={**_ROPES, "full_attention": {"rope_type": "yarn", "factor": 8.0,
                                                                     "rope_theta": 1e4}}),
         "rope_parameters.full_attention.rope_type='yarn' is not implemented"),
        ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
        ("smollm3", dict(no_rope_layers=[1, 0]), "no_rope_layers=.* one 0 / 1 per layer"),
        ("phi3", dict(attention_bias=True), "phi3: attention_bias=True is not supported"),
        ("olmo2", dict(mlp_bias=True), "olmo2: config field mlp_bias=True"),
        ("llama", dict(rope_parameters=_ROPES), "llama: rope_parameters per layer type are not supported"),
    ],
)  # fmt: skip
def test_unsupported_settings_are_refused_naming_the_field(family, change, message):
    hf = TINY.get(family, tiny_hf_config("llama", **SIZES)) | {"model_type": family} | change
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_an_unknown_model_type_lists_every_supported_family():
    with pytest.raises(ModelConfigError, match="model_type='gemma4' is not supported") as e:
        ModelConfig.from_hf(dict(TINY["olmo2"], model_type="gemma4"))
    assert all(f in str(e.value) for f in FAMILIES) and set(NEW) <= set(FAMILIES)
    multimodal = dict(
        TINY["gemma3_text"], model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]
    )
    with pytest.raises(ModelConfigError, match="multimodal Gemma 3 .* text-only model_type 'gemma3_text'"):
        ModelConfig.from_hf(multimodal)


# Published architectures: Gemma-3-1B, OLMo-2-1B, OLMo-3-7B, SmolLM3-3B, Phi-3-mini-4k.
REAL = {
    "gemma3_text": dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=512),
    "olmo2": dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16),
    "olmo3": dict(vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, sliding_window=4096),
    "smollm3": dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, sliding_window=2047),
}  # fmt: skip


@pytest.mark.parametrize("family", NEW)
def test_real_size_parameter_counts_equal_transformers(family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(family, **REAL[family])
    with torch.device("meta"):  # shapes only
        expected = sum(
            p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters()
        )
    config = ModelConfig.from_hf(hf_config.to_dict())
    for scan_layers in (False, True):
        abstract = nnx.eval_shape(
            lambda sl=scan_layers: Transformer(config, options=ModelOptions(scan_layers=sl), rngs=nnx.Rngs(0))
        )
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        assert sum(math.prod(x.shape) for x in leaves) == expected
    assert config.num_params() == expected


def _packed_batch():
    B, T = 2, 40
    seg = packed_segments(np.random.default_rng(3), B, T)
    pos = jnp.asarray(segment_positions(seg))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (B, T)), jnp.int32)
    return ids, pos, jnp.asarray(seg)


def _logits_and_grads(config, attention, scan_layers):
    ids, pos, seg = _packed_batch()
    model = Transformer(
        config, options=ModelOptions(scan_layers=scan_layers, attention=attention), rngs=nnx.Rngs(0)
    )
    assert model.options.attention == attention

    def loss(m):
        logits = m(ids, pos, seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits

    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return np.asarray(logits)[np.asarray(seg) > 0], value, jax.tree.leaves(grads)


@pytest.mark.parametrize(
    "family,kernel,scan_layers",
    [
        # the layer loop is slow here (12 s): loop and scan agree in tests/test_models_hf_parity.py; scanned
        # gemma3_text is slow too (17 s): olmo3 runs the same mix of sliding and full layers
        pytest.param("gemma3_text", "blocked", True, marks=pytest.mark.slow),
        pytest.param("gemma3_text", "blocked", False, marks=pytest.mark.slow),
        ("olmo3", "blocked", True),
        # smollm3 and olmo2 are slow (11 s each): olmo3 and phi3 run the same kernel, and every family's
        # logits equal transformers' in tests/test_models_hf_parity.py
        pytest.param("smollm3", "blocked", True, marks=pytest.mark.slow), ("phi3", "blocked", False),
        pytest.param("olmo2", "blocked", True, marks=pytest.mark.slow),
        # splash and pallas_gpu run interpreted on CPU (slow): tests/test_attention_pallas.py covers them
        pytest.param("gemma3_text", "splash", True, marks=pytest.mark.slow),
        pytest.param("smollm3", "pallas_gpu", True, marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_every_kernel_equals_dense_attention_on_packed_rows(family, kernel, scan_layers):
    """Logits and parameter gradients of each kernel equal attention="xla" (dense masks) on packed rows
    with padding: per-layer windows (gemma3, olmo3, phi3) and RoPE kinds (gemma3's two bases, smollm3's
    NoPE layers) picked by traced per-layer flags under the scan. splash and pallas_gpu run in Pallas'
    interpret mode on a CPU."""
    config = ModelConfig.from_hf(TINY[family])
    logits_k, loss_k, grads_k = _logits_and_grads(config, kernel, scan_layers)
    logits_x, loss_x, grads_x = _logits_and_grads(config, "xla", scan_layers)
    np.testing.assert_allclose(logits_k, logits_x, atol=2e-5)
    np.testing.assert_allclose(loss_k, loss_x, rtol=1e-5)
    for a, b in zip(grads_k, grads_x, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma3_text", "olmo3", "phi3"])
def test_sliding_layers_keep_the_shared_prompt_rule_and_pallas_gpu_refuses_them(family):
    """A window counts row slots, which a branch after its sibling does not share with the prompt: a
    sliding model never gets the shared-prompt layout; pallas_gpu has no window, so auto picks blocked."""
    config = ModelConfig.from_hf(TINY[family])
    on, reason = shares_prompt("auto", "blocked", config)
    assert not on and f"{family} has sliding_window=" in reason
    with pytest.raises(ConfigError, match="data.shared_prompt=true cannot run here"):
        shares_prompt("true", "blocked", config)
    with pytest.raises(ConfigError, match="model.attention=pallas_gpu cannot run this model"):
        resolve_attention("pallas_gpu", config)
    choice = resolve_attention("auto", config, backend="gpu")  # (tiny gemma3 also soft-caps)
    assert choice.kernel == "blocked" and "not pallas_gpu: it" in choice.reason


@pytest.mark.parametrize("family", ["olmo2", "smollm3"])
def test_models_without_a_window_share_the_prompt(family):
    assert shares_prompt("true", "blocked", ModelConfig.from_hf(TINY[family]))[0]


def test_plan_counts_phi3_adapters_on_the_fused_projections():
    """`jdpo plan` builds the adapters a run would: the default targets land on qkv_proj and gate_up_proj."""
    from jdpo.commands.plan import abstract_params
    from jdpo.config import LoRASection

    config = ModelConfig.from_hf(TINY["phi3"])
    lora = LoRASection(rank=4, alpha=8.0)  # the default targets; a section is hashable (the plan caches)
    params = {name: shape for name, shape, _, _ in abstract_params(config, lora=lora)}
    D, F, N, K, H = 32, 48, 4, 2, 8
    assert params["layers.0.self_attn.qkv_proj.lora_b"] == (4, N + 2 * K, H)
    assert params["layers.2.mlp.gate_up_proj.lora_a"] == (D, 4)
    assert params["layers.2.mlp.gate_up_proj.lora_b"] == (4, 2, F)
    assert sum(name.endswith("lora_a") for name in params) == 3 * 4  # 3 layers x 4 projections
