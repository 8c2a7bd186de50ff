"""Logit parity with `transformers` (PyTorch, CPU, float32) for every family, both layer layouts, and export.

Each case builds a tiny random HF model from a config written here, perturbs every parameter (so biases
and norm weights are not at their trivial init), saves it (some cases as several safetensors files plus an
index), loads it with jdpo and compares float32 logits on right-padded inputs at non-pad positions.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jdpo.models import ModelConfig, ModelOptions, from_pretrained, save_pretrained  # noqa: E402

TOL = 1e-4
B, T, V = 3, 16, 160
LENGTHS = (16, 11, 6)  # right padding: rows 1 and 2 end with pads
BASE = dict(
    vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=64
)

# name -> (model_type, config overrides, max_shard_size for HF save or None)
CASES = {
    "llama_gqa_untied_llama3rope": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,  # tiny so the scaling bands matter at T=16
            ),
        ),
        "30KB",
    ),
    "llama_mha_tied_attention_bias": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True),
        None,
    ),
    "mistral_sliding_linear_rope": (
        "mistral",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=5,
            tie_word_embeddings=False,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
        None,
    ),
    "qwen2_bias_tied": (
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
        "40KB",
    ),
    "qwen3_qknorm": (
        "qwen3",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
        None,
    ),
    "gemma_mqa": ("gemma", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16), None),
    "gemma2_softcap_alternating": (
        "gemma2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=4.0,  # small caps so the tanh is far from linear
            final_logit_softcapping=2.0,
        ),
        "50KB",
    ),
    # Gemma 3: local / global layers with their own RoPE (the global one linearly scaled), QK-norm with the
    # gemma (1 + w) offset, sandwich norms, query_pre_attn_scalar, final soft-cap.
    "gemma3_local_global_rope": (
        "gemma3_text",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            final_logit_softcapping=2.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        "50KB",
    ),
    "olmo2_post_norm": ("olmo2", dict(num_attention_heads=4, num_key_value_heads=2), None),
    "olmo3_sliding_full": (
        "olmo3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 5e5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        None,
    ),
    "smollm3_nope_layers": (
        "smollm3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            no_rope_layers=[1, 0, 1],
            rope_theta=1e5,
            pad_token_id=0,
        ),
        None,
    ),
    # Phi-3: fused qkv_proj / gate_up_proj; LongRoPE with rows longer than the original length (8), so
    # the long factors and the attention factor apply.
    "phi3_fused_longrope": (
        "phi3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            original_max_position_embeddings=8,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
                "original_max_position_embeddings": 8,
            },
        ),
        "40KB",
    ),
    "phi3_mha_sliding": (
        "phi3",
        dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=6, pad_token_id=0),
        None,
    ),
}


def _inputs():
    rng = np.random.RandomState(0)
    ids = rng.randint(0, V, (B, T)).astype(np.int64)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return ids, mask


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _max_diff(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A saved tiny HF model of one family and its reference logits."""
    name = request.param
    model_type, overrides, shard_size = CASES[name]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **BASE, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    if shard_size:
        model.save_pretrained(path, max_shard_size=shard_size)
    else:
        model.save_pretrained(path)
    ids, mask = _inputs()
    return dict(
        name=name, path=path, sharded=bool(shard_size), ids=ids, mask=mask, ref=_hf_logits(model, ids, mask)
    )


def _jdpo_logits(model, case):
    return model(jnp.asarray(case["ids"], jnp.int32), segment_ids_BxT=jnp.asarray(case["mask"], jnp.int32))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(case, scan_layers):
    model, config = from_pretrained(case["path"], options=ModelOptions(scan_layers=scan_layers))
    diff = _max_diff(_jdpo_logits(model, case), case["ref"], case["mask"])
    print(f"{case['name']} scan={scan_layers}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL, f"{case['name']}: max abs logit difference {diff}"


def test_checkpoint_layout(case):
    """The sharded cases really are several files + index; the tests above loaded through it."""
    files = sorted(f for f in os.listdir(case["path"]) if f.endswith(".safetensors"))
    if case["sharded"]:
        assert len(files) > 1
        with open(case["path"] / "model.safetensors.index.json") as f:
            assert set(json.load(f)["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_export_reloads_in_transformers(case, scan_layers, tmp_path):
    model, config = from_pretrained(case["path"], options=ModelOptions(scan_layers=scan_layers))
    # a small shard size exercises the multi-file export and its index
    save_pretrained(model, tmp_path, max_shard_size="40KB" if scan_layers else "5GB")
    assert ModelConfig.from_hf(tmp_path) == config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    diff = _max_diff(_hf_logits(reloaded, case["ids"], case["mask"]), case["ref"], case["mask"])
    assert diff <= TOL, f"{case['name']}: exported model differs by {diff}"
    # and jdpo reads its own export back
    again, _ = from_pretrained(tmp_path, options=ModelOptions(scan_layers=not scan_layers))
    assert _max_diff(_jdpo_logits(again, case), case["ref"], case["mask"]) <= TOL
