"""Training mixture-of-experts models (issue 29): the router's load-balancing loss equals transformers'
`aux_loss` on the same padded batch, enters the train step's loss (never the reference's) with its
metrics, `model.freeze_router` leaves the router bitwise unchanged, a resumed MoE run is bit-identical,
and experts sharded over `mesh.expert` (data 2 x expert 4, and data 2 x fsdp 2 x expert 2, of 8 CPU
devices) run and train like one device."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import logged_records, one_device, run_config
from helpers import train_steps as steps

from jdpo.errors import ConfigError
from jdpo.losses.router import load_balancing_loss
from jdpo.models import ModelConfig, from_pretrained, init_model, load_tokenizer, save_pretrained
from jdpo.models.adapters import model_targets
from jdpo.models.choices import LORA_TARGETS
from jdpo.parallel.sharding import make_mesh
from jdpo.train import trainer as train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def moe_assets(assets, tmp_path_factory):
    """The tiny task with a random qwen3_moe model (4 experts, top 2; the checkpoint's coefficient 0.02)
    in place of the dense one."""
    tokenizer = load_tokenizer(str(assets.model_dir))
    dense = ModelConfig.from_hf(assets.model_dir)
    config = dataclasses.replace(
        dense, family="qwen3_moe", qk_norm=True, num_experts=4, experts_per_token=2, moe_intermediate_size=32,
        norm_topk_prob=True, router_aux_loss_coef=0.02,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("moe_model")
    save_pretrained(init_model(config, seed=1), path, tokenizer=tokenizer)
    return dataclasses.replace(assets, model_dir=path)


def make_config(assets, out, **overrides):
    return run_config(assets, out, **{"train.max_steps": 3, "train.log_every": 1, "train.export": False,
                                      **overrides})  # fmt: skip


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        pytest.param(  # slow (15 s): the formula by mixtral and gpt_oss; dense layers by test_models_moe
            "qwen3_moe",
            dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1]),
            marks=pytest.mark.slow,
        ),
        ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
        ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2)),  # the router's bias in the logits
    ],
)
def test_aux_loss_equals_transformers(model_type, overrides, tmp_path):
    """On right-padded rows: transformers weights each layer's rows by the attention mask (padding out)
    and pools the MoE layers; jdpo's statistics count the tokens of segment != 0 the same way."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, **overrides,
    )  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))  # routers far from uniform
    hf.save_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(0, 64, (3, 10))
    mask = (np.arange(10)[None] < np.array([[10], [6], [3]])).astype(np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  output_router_logits=True).aux_loss.item()  # fmt: skip
    model, _ = from_pretrained(tmp_path)
    _, stats = model.hidden_and_router(
        jnp.asarray(ids, jnp.int32), segment_ids_BxT=jnp.asarray(mask, jnp.int32)
    )
    assert stats["counts"].shape == (1 if model_type == "qwen3_moe" else 2, config.num_local_experts)
    got = float(load_balancing_loss(stats["counts"], stats["probs"], stats["tokens"]))
    assert got == pytest.approx(want, rel=1e-5)
    # padding counts: the unmasked loss differs
    _, all_rows = model.hidden_and_router(jnp.asarray(ids, jnp.int32))
    assert float(
        load_balancing_loss(all_rows["counts"], all_rows["probs"], all_rows["tokens"])
    ) != pytest.approx(got)


def _router_and_experts(tr):
    model = tr.model()
    mlp = model.layers[0].mlp
    return np.asarray(mlp.router.kernel[...]), np.asarray(mlp.experts.up_proj[...])


def test_aux_loss_enters_the_training_loss_with_its_metrics(moe_assets, tmp_path):
    """The coefficient defaults to the checkpoint's (0.02): step 1's loss is ln 2 (policy == reference:
    the reference pass has no aux term) plus 0.02 x aux_loss; the router trains."""
    tr = train.Trainer(make_config(moe_assets, tmp_path / "a"), mesh=one_device())
    assert tr.moe.aux_loss_coef == 0.02
    router0, _ = _router_and_experts(tr)
    first, second = steps(tr, 2)
    assert first["aux_loss"] > 0 and first["moe/expert_load_max"] >= 1.0 >= first["moe/expert_load_min"] >= 0
    assert first["loss"] == pytest.approx(math.log(2) + 0.02 * first["aux_loss"], abs=1e-6)
    assert second["loss"] != pytest.approx(first["loss"], abs=1e-6)
    assert not np.array_equal(_router_and_experts(tr)[0], router0)  # so freezing it is a real test


def test_freeze_router_leaves_the_router_bitwise_unchanged(moe_assets, tmp_path):
    """With a large aux coefficient and weight decay, the router still does not move; the experts do."""
    over = {"model.router_aux_loss_coef": 0.1, "optim.weight_decay": 0.1, "model.freeze_router": True}
    frozen = train.Trainer(make_config(moe_assets, tmp_path / "f", **over), mesh=one_device())
    router0, experts0 = _router_and_experts(frozen)
    steps(frozen, 2)
    router1, experts1 = _router_and_experts(frozen)
    assert np.array_equal(router0, router1) and not np.array_equal(experts0, experts1)


def test_moe_settings_refused_on_a_dense_model(assets, tmp_path):
    for over, field in [({"model.freeze_router": True}, "model.freeze_router=True"),
                        ({"mesh.expert": 2, "mesh.fsdp": 1}, "mesh.expert=2")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"{field}: model.path=.* is a dense llama model"):
            train.Trainer(make_config(assets, tmp_path / "d", **over), mesh=one_device())


# slow (17 s): bit-identical resume is covered fast by test_train.py; the MoE step by the tests above.
@pytest.mark.slow
def test_resume_of_an_moe_run_is_bit_identical(moe_assets, tmp_path):
    over = {"train.max_steps": 4, "train.save_every": 2, "model.router_aux_loss_coef": 0.05}
    full = train.run(make_config(moe_assets, tmp_path / "full", **over), mesh=one_device())
    cfg = make_config(moe_assets, tmp_path / "resumed", **over)
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 2], mesh=one_device())
    assert first.step == 2
    result = train.Trainer(cfg, mesh=one_device()).fit()
    want, got = logged_records(full.metrics_path), logged_records(result.metrics_path)
    assert [r["step"] for r in got if "aux_loss" in r] == [1, 2, 3, 4]
    assert got == want


@pytest.mark.parametrize(
    "data,fsdp,expert",
    # data2_expert4 is slow (14 s): data2_fsdp2_expert2 splits the experts too, with fsdp
    [pytest.param(2, 1, 4, marks=pytest.mark.slow), (2, 2, 2)],
    ids=["data2_expert4", "data2_fsdp2_expert2"],
)
def test_expert_sharded_forward_matches_one_device(moe_assets, data, fsdp, expert):
    """The MoE forward and its router statistics with the experts sharded over the expert axis (and with
    fsdp, their model dimension over fsdp like every parameter's), the rows over every axis: the same
    hidden states and statistics as one device."""
    model, config = from_pretrained(moe_assets.model_dir)
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 100, (8, 12)), jnp.int32)
    segments = jnp.asarray(np.arange(12)[None] < np.arange(5, 13)[:, None], jnp.int32)
    want_h, want_stats = model.hidden_and_router(ids, segment_ids_BxT=segments)
    mesh = make_mesh(data, fsdp, 1, expert=expert)
    sharded, _ = from_pretrained(moe_assets.model_dir, mesh=mesh)
    kernel = sharded.layers[0].mlp.experts.up_proj.get_value()  # [E, D, F]
    want_shard = (config.num_experts // expert, config.hidden_size // fsdp)
    assert kernel.sharding.shard_shape(kernel.shape)[:2] == want_shard
    with jax.set_mesh(mesh):
        got_h, got_stats = jax.jit(lambda i, s: sharded.hidden_and_router(i, segment_ids_BxT=s))(
            ids, segments
        )
    np.testing.assert_allclose(got_h, want_h, atol=1e-5)
    for k in want_stats:
        np.testing.assert_allclose(got_stats[k], want_stats[k], rtol=1e-6)


FSDP_EXPERT = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2}


# ~22 s on 2 cores: the forward on the same mesh is test_expert_sharded_forward_matches_one_device's
# data2_fsdp2_expert2 case, an MoE train step test_aux_loss_enters_the_training_loss_with_its_metrics.
@pytest.mark.slow
def test_expert_and_fsdp_sharded_train_step_matches_one_device(moe_assets, tmp_path):
    """One DPO step on data 2 x fsdp 2 x expert 2 (the aux loss on): loss, aux loss and gradient norm."""
    over = {"model.router_aux_loss_coef": 0.05, "train.max_steps": 1, **FSDP_EXPERT}
    single = steps(train.Trainer(make_config(moe_assets, tmp_path / "one", **over), mesh=one_device()), 1)
    sharded_tr = train.Trainer(
        make_config(moe_assets, tmp_path / "fsdp_ep", **over), mesh=make_mesh(2, 2, 1, expert=2)
    )
    sharded = steps(sharded_tr, 1)
    for k in ("loss", "aux_loss", "grad_norm", "moe/expert_load_max", "rewards/margins"):
        assert single[0][k] == pytest.approx(sharded[0][k], rel=1e-4, abs=1e-6), k


def test_generate_on_an_expert_mesh_matches_one_device(moe_assets, tmp_path):
    """`jdpo generate --mesh 2,1,1,expert=4`: the experts over 4 devices, the same greedy completions."""
    from jdpo.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(8)))
    args = [
        "generate",
        "--model",
        str(moe_assets.model_dir),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "3",
    ]
    outs = []
    for i, mesh in enumerate([[], ["--mesh", "2,1,1,expert=4"]]):
        outs.append(tmp_path / f"out{i}.jsonl")
        assert main([*args, *mesh, "--out", str(outs[-1])]) == 0
    assert outs[0].read_text() == outs[1].read_text()


@pytest.mark.slow  # 30 s; the sharded forward above is the fast check
def test_expert_parallel_run_matches_one_device(moe_assets, tmp_path):
    """data 2 x expert 4: each device holds one expert and a quarter of each data shard's rows."""
    over = {"model.router_aux_loss_coef": 0.05, "mesh.data": 2, "mesh.fsdp": 1, "mesh.expert": 4}
    single = steps(train.Trainer(make_config(moe_assets, tmp_path / "one", **over), mesh=one_device()), 3)
    sharded_tr = train.Trainer(
        make_config(moe_assets, tmp_path / "ep", **over), mesh=make_mesh(2, 1, 1, expert=4)
    )
    kernel = sharded_tr.state.params["layers"][0]["mlp"]["experts"]["up_proj"].get_value()
    assert kernel.sharding.shard_shape(kernel.shape)[0] == 1  # one expert per device
    sharded = steps(sharded_tr, 3)
    for a, b in zip(single, sharded, strict=True):
        for k in ("loss", "aux_loss", "grad_norm", "moe/expert_load_max", "rewards/margins"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_plain_mlp_names_on_an_moe_model_are_refused_before_the_model_loads(moe_assets, tmp_path):
    over = {"lora.rank": 4, "lora.targets": ["q_proj", "gate_proj"]}
    with pytest.raises(
        ConfigError, match="lora.targets: 'gate_proj' on qwen3_moe is an MoE layer's experts'"
    ):
        train.Trainer(make_config(moe_assets, tmp_path / "experts", **over), mesh=one_device())


def test_the_default_lora_targets_of_an_moe_model_are_its_attention_projections(assets, moe_assets):
    """The default names every projection; on an MoE model that is the attention (no expert adapters)."""
    moe, dense = ModelConfig.from_hf(moe_assets.model_dir), ModelConfig.from_hf(assets.model_dir)
    assert set(model_targets(LORA_TARGETS, moe)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(model_targets(LORA_TARGETS, dense)) == set(LORA_TARGETS)


@pytest.mark.slow  # 28 s; the expert adapters' parity, gradients and export are test_lora_moe.py's, fast
def test_lora_on_the_experts_trains_the_expert_adapters_and_exports(moe_assets, tmp_path):
    """A LoRA run with per-expert adapters: the step moves them (the frozen experts stay as loaded), the
    FLOPs count k of E expert adapters, and the PEFT export equals the merged one."""
    over = {"lora.rank": 2, "lora.targets": ["q_proj", "experts.gate_up_proj", "experts.down_proj"],
            "train.max_steps": 1, "optim.learning_rate": 1e-2, "train.export": True}  # fmt: skip
    tr = train.Trainer(make_config(moe_assets, tmp_path / "experts", **over), mesh=one_device())
    experts = tr.state.params["layers"][0]["mlp"]["experts"]
    assert set(experts) == {
        "gate_up_proj_lora_a",
        "gate_up_proj_lora_b",
        "down_proj_lora_a",
        "down_proj_lora_b",
    }
    before = np.asarray(experts["down_proj_lora_b"].get_value())
    kernel = np.asarray(tr.state.base["layers"][0]["mlp"]["experts"]["down_proj"].get_value())
    E, D, F, r, L = 4, tr.model_config.hidden_size, 32, 2, tr.model_config.num_layers
    q = D * r + r * tr.model_config.num_heads * tr.model_config.head_dim
    assert tr.lora_params() == L * (q + (E * (D * r + r * 2 * F) + E * (F * r + r * D)) * 2 // E)
    result = tr.fit()
    after = tr.state.params["layers"][0]["mlp"]["experts"]
    assert np.abs(np.asarray(after["down_proj_lora_b"].get_value()) - before).max() > 0
    assert np.array_equal(
        np.asarray(tr.state.base["layers"][0]["mlp"]["experts"]["down_proj"].get_value()), kernel
    )
    cfg = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    from jdpo.models.peft import from_adapter_dir

    ids = jnp.asarray(np.random.RandomState(0).randint(1, 100, (2, 10)), jnp.int32)
    adapted, _ = from_adapter_dir(result.final_dir)
    merged, _ = from_pretrained(result.final_dir.parent / "final_merged")
    np.testing.assert_allclose(np.asarray(adapted(ids)), np.asarray(merged(ids)), atol=1e-5)


@pytest.mark.slow  # 33 s; the refusal above and the attention LoRA of the dense models' tests are fast
def test_lora_on_an_moe_model_adapts_the_attention(moe_assets, tmp_path):
    over = {"lora.rank": 4, "lora.targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "train.max_steps": 1}
    result = train.run(
        make_config(moe_assets, tmp_path / "lora", **over, **{"train.export": True}), mesh=one_device()
    )
    assert result.step == 1 and (result.final_dir / "adapter_model.safetensors").exists()
    merged, config = from_pretrained(result.final_dir.parent / "final_merged")
    assert config.num_experts == 4
