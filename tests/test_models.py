"""Model behaviour that needs no PyTorch: packing, padding, layouts, remat, dtypes, strict checkpoint
accounting, config errors and real-size parameter counts (via eval_shape, nothing allocated)."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config
from safetensors.numpy import load_file, save_file

from jdpo.models import (
    CheckpointError,
    ModelConfig,
    ModelOptions,
    Transformer,
    from_pretrained,
    save_pretrained,
)
from jdpo.models.choices import SCAN_LAYERS_ABOVE, layer_loop

TINY_CONFIGS = {family: tiny_hf_config(family, num_hidden_layers=3) for family in ("llama", "gemma2")}


@nnx.jit
def forward(model, ids_BxT, positions_BxT=None, segment_ids_BxT=None):
    return model(ids_BxT, positions_BxT, segment_ids_BxT)


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def ckpt(request, tmp_path_factory):
    """(path, config) of a saved tiny jdpo model."""
    config = ModelConfig.from_hf(TINY_CONFIGS[request.param])
    model = random_model(config)
    path = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    save_pretrained(model, path)
    return path, config


def _row(lengths, T):
    """Packed row: segment ids 1..S, positions restarting per segment, zeros as padding."""
    seg, pos = np.zeros(T, np.int32), np.zeros(T, np.int32)
    start = 0
    for s, n in enumerate(lengths, start=1):
        seg[start : start + n] = s
        pos[start : start + n] = np.arange(n)
        start += n
    return seg, pos


def test_packed_segments_equal_separate_runs(ckpt):
    model, _ = from_pretrained(ckpt[0])
    T, lengths = 20, (7, 9)
    ids = np.random.RandomState(0).randint(0, 128, (1, T)).astype(np.int32)
    seg, pos = _row(lengths, T)
    packed = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pos[None]), jnp.asarray(seg[None])))
    start = 0
    for n in lengths:
        alone = np.asarray(forward(model, jnp.asarray(ids[:, start : start + n])))
        np.testing.assert_allclose(packed[0, start : start + n], alone[0], atol=1e-5)
        start += n


def test_padding_gives_finite_values_and_grads(ckpt):
    model, _ = from_pretrained(ckpt[0])
    T = 10
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 128, (3, T)), jnp.int32)
    seg = jnp.asarray([_row((6,), T)[0], np.zeros(T, np.int32), _row((3, 4), T)[0]])  # row 1 is all padding

    def loss(m):
        return jnp.sum(m(ids, segment_ids_BxT=seg) ** 2)  # padded rows included on purpose

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_sliding_window_is_applied():
    """Sanity check that the window really masks: parity with HF alone would pass if both ignored it."""
    hf = dict(TINY_CONFIGS["llama"], model_type="mistral", sliding_window=3)
    windowed = random_model(ModelConfig.from_hf(hf))
    full = random_model(ModelConfig.from_hf(dict(hf, sliding_window=None)))
    ids = jnp.arange(12, dtype=jnp.int32)[None]
    a, b = np.asarray(forward(windowed, ids)), np.asarray(forward(full, ids))
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)  # inside the window: identical
    assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1e-4


def test_attention_kernel_choice_is_checked():
    """Bad kernel names and kernels the model cannot run (pallas_gpu has no soft-cap) fail when the model
    is built, before any weight loads; cudnn is gone (it handed cuDNN a dense mask)."""
    llama = ModelConfig.from_hf(TINY_CONFIGS["llama"])
    for name in ("flash", "cudnn"):
        with pytest.raises(ValueError, match="attention must be one of"):
            nnx.eval_shape(
                lambda n=name: Transformer(llama, options=ModelOptions(attention=n), rngs=nnx.Rngs(0))
            )
    gemma2 = ModelConfig.from_hf(TINY_CONFIGS["gemma2"])
    with pytest.raises(ValueError, match="cannot soft-cap attention logits"):
        nnx.eval_shape(
            lambda: Transformer(gemma2, options=ModelOptions(attention="pallas_gpu"), rngs=nnx.Rngs(0))
        )
    # Building a pallas_gpu llama works anywhere (off a GPU it runs in Pallas' interpret mode).
    model = nnx.eval_shape(
        lambda: Transformer(llama, options=ModelOptions(attention="pallas_gpu"), rngs=nnx.Rngs(0))
    )
    assert (model.options.attention, model.options.attention_block) == ("pallas_gpu", 128)


def test_model_options_from_the_config_section():
    """A run's `model:` section becomes one ModelOptions, every run-time field carried (a new config
    field that does not reach the model fails here); bad values fail when the options are built."""
    import dataclasses

    from jdpo.config import ModelSection

    section = ModelSection(
        path="x", param_dtype="bfloat16", remat="full", scan_layers="true", attention="xla", attention_block=32
    )
    two_layers = ModelConfig.from_hf(TINY_CONFIGS["llama"])  # three layers: the loop under "auto"
    got = ModelOptions.from_section(section, dtype=jnp.bfloat16, model_config=two_layers)
    assert got == ModelOptions(jnp.bfloat16, jnp.dtype("bfloat16"), "full", True, "xla", 32)
    fields = {f.name for f in dataclasses.fields(ModelOptions)}
    # lora comes from the run's `lora:` section (jdpo.models.lora.model_options), context from `mesh:`, the
    # rest from `model:`; router_aux_loss_coef is the train step's (jdpo.train.router_loss), not the
    # model's, and context_balance the data layer's (how the host lays out rows: run_data.decide_balance).
    assert fields - {"lora", "context"} == {f.name for f in dataclasses.fields(ModelSection)} - {
        "path",
        "router_aux_loss_coef",
        "context_balance",
    }
    assert ModelOptions.from_section(section, dtype=jnp.bfloat16, model_config=two_layers, context=4).context == 4
    # "auto": scanned (with dots_saveable remat) above SCAN_LAYERS_ABOVE layers of one kind, else the loop.
    auto = dataclasses.replace(section, scan_layers="auto", remat="auto")
    deep = dataclasses.replace(two_layers, num_layers=SCAN_LAYERS_ABOVE + 1)
    for config, want in ((two_layers, (False, "none")), (deep, (True, "dots_saveable"))):
        got = ModelOptions.from_section(auto, dtype=jnp.float32, model_config=config)
        assert (got.scan_layers, got.remat) == want
    assert layer_loop("auto", "auto", num_layers=48, mixed_layers=True) == (False, "none")  # MoE + dense
    assert layer_loop("auto", "full", num_layers=48, mixed_layers=False) == (True, "full")
    with pytest.raises(ValueError, match="remat must be one of"):
        ModelOptions(remat="some")


def test_hidden_states_and_unembedding_give_logits(ckpt):
    model, config = from_pretrained(ckpt[0])
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    h_BxTxD, unembed_DxV, out = nnx.jit(lambda m, i: (m.hidden_states(i), m.unembedding(), m(i)))(model, ids)
    assert h_BxTxD.shape == (1, 8, config.hidden_size) and unembed_DxV.shape == (config.hidden_size, 128)
    logits = jnp.einsum("BTD,DV->BTV", h_BxTxD, unembed_DxV)
    if config.final_logit_softcapping:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    np.testing.assert_allclose(np.asarray(out), np.asarray(logits), atol=1e-5)


def test_remat_policies_keep_loss_and_grads(ckpt):
    scan_layers = ckpt[1].family == "gemma2"  # one layout per config keeps the compile count down
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 9)), jnp.int32)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    ref_model, _ = from_pretrained(ckpt[0], options=ModelOptions(scan_layers=scan_layers))
    ref_value, ref_grads = nnx.jit(nnx.value_and_grad(loss))(ref_model)
    for remat in ("full", "dots_saveable"):
        model, _ = from_pretrained(ckpt[0], options=ModelOptions(scan_layers=scan_layers, remat=remat))
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        np.testing.assert_allclose(float(value), float(ref_value), atol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)


def test_bf16_compute_and_params(ckpt, tmp_path):
    path, _ = ckpt
    ids = jnp.arange(10, dtype=jnp.int32)[None]
    ref = np.asarray(forward(from_pretrained(path)[0], ids))
    mixed, _ = from_pretrained(path, options=ModelOptions(dtype=jnp.bfloat16))
    assert mixed.embed_tokens.embedding.get_value().dtype == jnp.float32
    pure_bf16 = ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True)
    pure, _ = from_pretrained(path, options=pure_bf16)
    assert pure.layers.mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    for m in (mixed, pure):
        out = np.asarray(forward(m, ids))
        assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.1
    save_pretrained(pure, tmp_path)  # bf16 export keeps bf16 and reloads
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    again, _ = from_pretrained(tmp_path, options=pure_bf16)
    np.testing.assert_array_equal(np.asarray(forward(again, ids)), np.asarray(forward(pure, ids)))


# ---- strict key accounting -------------------------------------------------------------------------


def _edit_checkpoint(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_extra_tensor_is_an_error_naming_key_and_file(ckpt, tmp_path):
    path = _edit_checkpoint(ckpt[0], tmp_path / "c", lambda t: t.update(stray=np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"'stray' in file model\.safetensors"):
        from_pretrained(path)


def test_missing_tensor_is_an_error_naming_key_and_file(ckpt, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    path = _edit_checkpoint(ckpt[0], tmp_path / "c", lambda t: t.pop(key))
    with pytest.raises(
        CheckpointError, match=rf"missing tensor '{key}'.*layers\.1\.mlp\.up_proj\.kernel.*{path}"
    ):
        from_pretrained(path)


def test_wrong_shape_is_an_error_naming_key_and_file(ckpt, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"
    path = _edit_checkpoint(ckpt[0], tmp_path / "c", lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(CheckpointError, match=rf"'{key}' in file model\.safetensors has shape \(15, 32\)"):
        from_pretrained(path, options=ModelOptions(scan_layers=True))


def test_index_pointing_at_missing_file_is_an_error(ckpt, tmp_path):
    shutil.copytree(ckpt[0], tmp_path / "c")
    with open(tmp_path / "c" / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.embed_tokens.weight": "gone.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        from_pretrained(tmp_path / "c")


# ---- config errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_type='yarn'"),
        (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope_type='dynamic'"),
        (dict(hidden_act="relu"), "hidden_act='relu'"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ],
)
def test_unsupported_config_fails_naming_the_field(change, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf({**TINY_CONFIGS["llama"], **change})
    with open(tmp_path / "config.json", "w") as f:  # and at load, before any tensor is read
        json.dump({**TINY_CONFIGS["llama"], **change}, f)
    with pytest.raises(ValueError, match="not"):
        from_pretrained(tmp_path)


def test_a_config_json_that_is_not_a_causal_lm_is_refused_naming_file_and_field(ckpt, tmp_path):
    from jdpo.models.families import ModelConfigError

    shutil.copytree(ckpt[0], tmp_path / "c")
    hf = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(
        json.dumps({**hf, "architectures": ["LlamaForSequenceClassification"]})
    )
    where = str(tmp_path / "c" / "config.json")
    with pytest.raises(
        ModelConfigError, match=rf"{where}: field 'architectures' is \['LlamaForSequenceClassification'\]"
    ):
        from_pretrained(tmp_path / "c")
    with pytest.raises(ModelConfigError, match=r"no such file"):
        ModelConfig.from_hf(tmp_path / "nowhere")


def test_the_export_leaves_out_a_dangling_auto_map(ckpt, tmp_path):
    from helpers_tokenizer import make_tokenizer

    tok = make_tokenizer(None)
    tok.init_kwargs["auto_map"] = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}
    model, _ = from_pretrained(ckpt[0])
    save_pretrained(model, tmp_path / "final", tokenizer=tok)
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((tmp_path / "final" / name).read_text())
    # Code that is there, or a hub repository, is kept.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "tokenization_x.py").write_text("")
    tok.init_kwargs["auto_map"] = {"AutoTokenizer": ["org/repo--tok.Slow", "tokenization_x.XTokenizer"]}
    save_pretrained(model, tmp_path / "kept", tokenizer=tok)
    assert json.loads((tmp_path / "kept" / "tokenizer_config.json").read_text())["auto_map"] == {
        "AutoTokenizer": ["org/repo--tok.Slow", "tokenization_x.XTokenizer"]
    }


def test_config_round_trips_through_hf_dict():
    for hf in TINY_CONFIGS.values():
        config = ModelConfig.from_hf(hf)
        assert ModelConfig.from_hf(config.to_hf()) == config
    assert ModelConfig.from_hf(TINY_CONFIGS["gemma2"]).layer_types == (
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    )


# ---- real-size parameter counts (eval_shape only) -------------------------------------------------------

REAL_CONFIGS = {
    "Llama-3-8B": (
        dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
             tie_word_embeddings=False),
        8_030_261_248,
    ),
    "Qwen2.5-7B": (
        dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
             tie_word_embeddings=False),
        7_615_616_512,
    ),
    "Mistral-7B-v0.1": (
        dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
             tie_word_embeddings=False),
        7_241_732_096,
    ),
    "Gemma-2-9B": (
        dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
             num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
             query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
             sliding_window=4096, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
        9_241_705_984,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_size_parameter_counts(name):
    hf, expected = REAL_CONFIGS[name]
    config = ModelConfig.from_hf(hf)
    for scan_layers in (False, True):
        abstract = nnx.eval_shape(
            lambda sl=scan_layers: Transformer(config, options=ModelOptions(scan_layers=sl), rngs=nnx.Rngs(0))
        )
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
        assert sum(math.prod(x.shape) for x in leaves) == expected
    assert config.num_params() == expected
