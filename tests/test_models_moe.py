"""Mixture-of-experts families (issue 29: qwen3_moe, mixtral, gpt_oss): logit parity with `transformers`
in float32 (every parameter moved off its init, right-padded rows), export back to `transformers`,
parameter counts, the config readers' refusals, and the dropless ragged dispatch against every expert
on every token."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_models_hf_parity import _hf_logits, _max_diff  # noqa: E402

from jdpo.errors import ConfigError  # noqa: E402
from jdpo.models import ModelConfig, ModelOptions, from_pretrained, save_pretrained  # noqa: E402
from jdpo.models.config import ModelConfigError  # noqa: E402
from jdpo.models.dispatch import dense_experts, expert_mlp, ragged_experts  # noqa: E402
from jdpo.models.kernels import resolve_attention  # noqa: E402

TOL = 1e-4
B, T, V = 2, 12, 96
LENGTHS = (12, 7)
BASE = dict(
    vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)  # fmt: skip
CASES = {
    # a dense layer among the MoE ones, top-3 of 6 without renormalising (mixtral renormalises)
    "qwen3_moe_mlp_only": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                                             mlp_only_layers=[1], norm_topk_prob=False)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
    # sliding / full layers, attention sinks, biases, the clamped SwiGLU (a low limit so it clamps), YaRN
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                swiglu_limit=0.5, rope_parameters={
                                    "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 8,
                                    "rope_theta": 1e4})),
}  # fmt: skip


def _inputs():
    ids = np.random.RandomState(0).randint(0, V, (B, T)).astype(np.int64)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return ids, mask


def hf_moe_model(model_type: str, **overrides):
    """A tiny random `transformers` MoE model with every parameter moved off its init."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def saved_moe_checkpoint(tmp_path_factory, name: str, model_type: str, overrides: dict):
    """`hf_moe_model(model_type, **overrides)` saved as a checkpoint folder named after `name`."""
    path = tmp_path_factory.mktemp(name)
    hf_moe_model(model_type, **overrides).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    model = hf_moe_model(model_type, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids, mask = _inputs()
    n_params = sum(p.numel() for p in model.parameters())
    return dict(
        name=request.param, path=path, ids=ids, mask=mask, ref=_hf_logits(model, ids, mask), n=n_params
    )


def _jdpo_logits(model, case):
    return model(jnp.asarray(case["ids"], jnp.int32), segment_ids_BxT=jnp.asarray(case["mask"], jnp.int32))


def _scan_ok(case) -> bool:
    return case["name"] != "qwen3_moe_mlp_only"


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(case, scan_layers):
    if scan_layers and not _scan_ok(case):
        with pytest.raises(ConfigError, match=r"scan_layers.*layers \[1\] are dense"):
            from_pretrained(case["path"], options=ModelOptions(scan_layers=True))
        return
    model, config = from_pretrained(case["path"], options=ModelOptions(scan_layers=scan_layers))
    assert config.num_params() == case["n"]
    diff = _max_diff(_jdpo_logits(model, case), case["ref"], case["mask"])
    assert diff <= TOL, f"{case['name']}: max abs logit difference {diff}"


def test_dense_dispatch_matches(case):
    """The every-expert one-hot dispatch runs the same model (the bench's baseline)."""
    model, _ = from_pretrained(case["path"], options=ModelOptions(moe_dispatch="dense"))
    assert _max_diff(_jdpo_logits(model, case), case["ref"], case["mask"]) <= TOL


def test_export_reloads_in_transformers(case, tmp_path):
    scan = _scan_ok(case)
    model, config = from_pretrained(case["path"], options=ModelOptions(scan_layers=scan))
    save_pretrained(model, tmp_path, max_shard_size="40KB")  # several files and the index
    assert ModelConfig.from_hf(tmp_path) == config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert _max_diff(_hf_logits(reloaded, case["ids"], case["mask"]), case["ref"], case["mask"]) <= TOL
    again, _ = from_pretrained(tmp_path)
    assert _max_diff(_jdpo_logits(again, case), case["ref"], case["mask"]) <= TOL


@pytest.mark.parametrize("limit", [None, 0.5], ids=["gated", "gpt_oss"])
def test_ragged_dispatch_equals_every_expert_reference(limit):
    """Sorting the assignments by expert and running grouped matmuls gives what computing every expert
    on every token and combining with one-hot weights gives, values and gradients, including experts
    no token chose (gpt_oss: with biases and the clamped SwiGLU, clamping some values)."""
    M, D, F, E, K = 40, 16, 24, 8, 2
    keys = iter(jax.random.split(jax.random.key(0), 8))
    shapes = {"down_proj": (E, F, D)}
    if limit is None:
        shapes.update(gate_proj=(E, D, F), up_proj=(E, D, F))
    else:
        shapes.update(gate_up_proj=(E, D, F, 2), gate_up_proj_bias=(E, F, 2), down_proj_bias=(E, D))
    kernels = {name: 0.3 * jax.random.normal(next(keys), s) for name, s in shapes.items()}
    x = jax.random.normal(next(keys), (M, D))
    experts = jax.random.randint(next(keys), (M, K), 0, E - 2)  # experts 6 and 7 get no token
    experts = experts.at[:, 1].set((experts[:, 0] + 1) % (E - 2))  # k distinct experts per token
    weights = jax.nn.softmax(jax.random.normal(next(keys), (M, K)))
    fn = functools.partial(expert_mlp, act="silu", limit=limit)

    def out(dispatch, x, kernels):
        return dispatch(x, experts, weights, kernels, fn, E)

    np.testing.assert_allclose(out(ragged_experts, x, kernels), out(dense_experts, x, kernels), atol=1e-5)
    g_ragged = jax.grad(lambda *a: jnp.sum(out(ragged_experts, *a) ** 2), argnums=(0, 1))(x, kernels)
    g_dense = jax.grad(lambda *a: jnp.sum(out(dense_experts, *a) ** 2), argnums=(0, 1))(x, kernels)
    for a, b in zip(jax.tree.leaves(g_ragged), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_moe_config_fields_and_refusals():
    qwen = ModelConfig.from_hf(dict(
        BASE, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        num_hidden_layers=4, decoder_sparse_step=2, router_aux_loss_coef=0.001,
    ))  # fmt: skip
    assert qwen.expert_layers == (False, True, False, True) and qwen.router_aux_loss_coef == 0.001
    assert not qwen.norm_topk_prob and qwen.qk_norm
    assert ModelConfig.from_hf(qwen.to_hf()) == qwen
    mixtral = ModelConfig.from_hf(dict(BASE, model_type="mixtral", num_local_experts=8))
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.norm_topk_prob) == (8, 2, True)
    assert mixtral.moe_intermediate_size == 48 and mixtral.router_aux_loss_coef == 0.0
    # active parameters: k of the E experts' projections per MoE layer
    assert mixtral.num_params() - mixtral.num_active_params() == 2 * 6 * 3 * 32 * 48
    with pytest.raises(ModelConfigError, match="router_jitter_noise=0.1 is not implemented"):
        ModelConfig.from_hf(dict(BASE, model_type="mixtral", router_jitter_noise=0.1))
    with pytest.raises(ModelConfigError, match="num_experts_per_tok=9 must be between 1 and the 8 experts"):
        ModelConfig.from_hf(dict(BASE, model_type="mixtral", num_local_experts=8, num_experts_per_tok=9))
    with pytest.raises(ModelConfigError, match=r"mlp_only_layers=\[5\] do not describe 2 layers"):
        ModelConfig.from_hf(dict(BASE, model_type="qwen3_moe", mlp_only_layers=[5]))
    # gpt_oss: transformers' defaults (top-4, alternating sliding / full, YaRN, biases, sinks)
    oss = ModelConfig.from_hf(dict(BASE, model_type="gpt_oss", num_hidden_layers=4, num_local_experts=8))
    assert (oss.experts_per_token, oss.sliding_window, oss.rope_type, oss.rope_factor) == (
        4,
        128,
        "yarn",
        32.0,
    )
    assert (
        oss.sliding_layers == (True, False, True, False)
        and oss.qkv_bias
        and oss.o_bias
        and oss.attention_sinks
    )
    assert ModelConfig.from_hf(oss.to_hf()) == oss
    assert resolve_attention("auto", oss).kernel == "xla"
    with pytest.raises(
        ConfigError, match="model.attention=blocked cannot run this model: it has no attention sinks"
    ):
        resolve_attention("blocked", oss)
    with pytest.raises(ModelConfigError, match="quantization_config='mxfp4'.*use a dequantised"):
        ModelConfig.from_hf(dict(BASE, model_type="gpt_oss", quantization_config={"quant_method": "mxfp4"}))


QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    moe_intermediate_size=768, norm_topk_prob=True,
)  # fmt: skip
MIXTRAL_8X7B = dict(
    model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
)  # fmt: skip


@pytest.mark.parametrize(
    "name,hf,expected",
    [
        ("Qwen3-30B-A3B", QWEN3_30B_A3B, (30_532_122_624, 3_353_032_704)),  # 30.5B total, 3.3B active
        ("Mixtral-8x7B", MIXTRAL_8X7B, (46_702_792_704, 12_879_925_248)),  # 46.7B total, 12.9B active
    ],
)
def test_real_size_parameter_counts(name, hf, expected):
    config = ModelConfig.from_hf(hf)
    assert (config.num_params(), config.num_active_params()) == expected, name
