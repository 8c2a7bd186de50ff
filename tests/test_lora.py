"""LoRA runs (jdpo.models.lora, jdpo.models.peft): only the adapters train and the base stays bitwise; the
reference is the base (or the init adapter), so step 1 is ln 2; the online reference holds no second copy
of the base; checkpoints hold the adapters alone and resume bit-identically; the PEFT export loads in
`peft` and the merged export in `transformers` with jdpo's logits; bad adapters and ranks are refused
before the weights load; 8 devices match 1.

One tiny model and task (conftest's `assets`); runs of 3 steps at a large learning rate so adapters move.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from helpers import one_device, run_config
from helpers import train_steps as steps

from jdpo import config as jconfig
from jdpo.models import lora
from jdpo.parallel.sharding import make_mesh
from jdpo.report import metrics
from jdpo.train import trainer as train

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "optim.learning_rate": 1e-2, "train.max_steps": 3}


def make_config(assets, out, **overrides):
    return run_config(assets, out, **{**LORA, **overrides})


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A 3-step LoRA run with its export: (trainer, the base before training, the adapters before)."""
    tr = train.Trainer(make_config(assets, tmp_path_factory.mktemp("lora") / "run"), mesh=one_device())
    before = host(tr.state.base), host(tr.state.params)
    tr.fit()
    return tr, *before


def test_lora_fields_are_in_the_help():
    names = {row[0] for row in jconfig.field_help()}
    assert {
        "lora.rank",
        "lora.alpha",
        "lora.dropout",
        "lora.targets",
        "lora.quantize",
        "lora.init_adapter",
    } <= names
    assert jconfig.Config().lora.rank == 0  # full fine-tuning by default


@pytest.mark.parametrize(
    "over, message",
    [
        ({"lora.dropout": 1.0}, "lora.dropout must be in"),
        ({"lora.rank": 0, "lora.dropout": 0.1}, "needs lora.rank"),
    ],
)
def test_a_bad_lora_dropout_is_refused(assets, tmp_path, over, message):
    with pytest.raises(jconfig.ConfigError, match=message):
        jconfig.validate(make_config(assets, tmp_path / "run", **over))


def test_an_unknown_target_is_refused_with_the_model_module_names(assets, tmp_path):
    with pytest.raises(jconfig.ConfigError, match=r"lora.targets: \['qkv'\].*q_proj, k_proj, v_proj"):
        make_config(assets, tmp_path / "run", **{"lora.targets": ["qkv", "q_proj"]})


def test_a_rank_above_a_target_dimension_is_refused_before_the_model_loads(assets, tmp_path, monkeypatch):
    from jdpo.models import hf

    monkeypatch.setattr(hf, "_load_array", lambda *a, **k: pytest.fail("the weights were loaded"))
    # The tiny model: hidden 32, 4 heads x 8 and 2 kv heads x 8, so k_proj's output is 16 wide.
    cfg = make_config(assets, tmp_path / "run", **{"lora.rank": 20, "lora.targets": ["k_proj"]})
    with pytest.raises(
        jconfig.ConfigError, match=r"lora.rank=20 is larger than k_proj's dimensions \(32 in, 16 out\)"
    ):
        train.Trainer(cfg, mesh=one_device())


def test_only_adapters_train_and_the_base_stays_bitwise(trained):
    tr, base0, adapters0 = trained
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(host(tr.state.base)), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(host(tr.state.base)), strict=True):
        np.testing.assert_array_equal(a, b)
    # B starts at zero and moved; the optimizer state is over the adapters alone (2 moments of each).
    moved = [
        np.abs(a - b).max()
        for a, b in zip(*map(jax.tree.leaves, (adapters0, host(tr.state.params))), strict=True)
    ]
    assert min(moved) > 0
    assert nbytes(tr.state.opt_state) < 2 * nbytes(tr.state.params) + 64
    assert nbytes(tr.state.params) < nbytes(tr.state.base) / 4


@pytest.mark.parametrize("reference", ["cached", "online"])
def test_first_step_loss_is_ln2(assets, tmp_path, reference):
    tr = train.Trainer(
        make_config(assets, tmp_path / "run", **{"dpo.reference": reference}), mesh=one_device()
    )
    first, second = steps(tr, 2)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first["rewards/margins"]) < 1e-6
    assert second["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the adapters moved the policy


def test_online_reference_holds_no_second_copy_of_the_base(assets, tmp_path):
    tr = train.Trainer(
        make_config(assets, tmp_path / "run", **{"dpo.reference": "online"}), mesh=one_device()
    )
    assert nbytes(tr.state.ref_params) == nbytes(tr.state.params)  # the reference adapters only
    assert set(tr.state.parts()) == {"params", "opt_state", "step", "rng", "ref_params", "base"}
    frozen = {id(x) for x in jax.tree.leaves(tr.state.base)}
    assert frozen == {id(x) for x in jax.tree.leaves(tr.state.base)}  # the one copy of the base


# Slow; in the default run both reference modes start at ln 2 and then move in test_first_step_loss_is_ln2.
@pytest.mark.slow
def test_cached_and_online_reference_agree(assets, tmp_path):
    cached = steps(train.Trainer(make_config(assets, tmp_path / "c"), mesh=one_device()), 3)
    online = train.Trainer(
        make_config(assets, tmp_path / "o", **{"dpo.reference": "online"}), mesh=one_device()
    )
    for a, b in zip(cached, steps(online, 3), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_checkpoint_holds_only_adapters_and_resume_is_bit_identical(assets, tmp_path):
    # With LoRA dropout, so the masks (drawn from the checkpointed step RNG) must be redrawn exactly.
    over = {"train.save_every": 2, "train.eval_every": 2, "train.export": False, "lora.dropout": 0.2}
    full = train.run(make_config(assets, tmp_path / "full", **over), mesh=one_device())
    cfg = make_config(assets, tmp_path / "resumed", **over)
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 2], mesh=one_device())
    assert first.stop_reason == "callback"
    saved = train.Trainer(cfg, mesh=one_device())
    # What a checkpoint saves: adapters, their AdamW moments, step and RNG; never the base.
    saved_tree = saved.state.to_checkpoint()
    assert set(saved_tree) == {"params", "opt_state", "step", "rng"}
    assert 0 < nbytes(saved_tree) - 3 * nbytes(saved.state.params) < 64  # + step, RNG, Adam's count
    result = saved.fit()

    def records(path):
        timing = {"step_time", "tokens_per_sec", "mfu"}
        return [{k: v for k, v in r.items() if k not in timing} for r in metrics.read_metrics(path)]

    assert records(result.metrics_path) == records(full.metrics_path)


def test_peft_export_loads_in_peft_and_the_merged_export_in_transformers(trained):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tr, _, _ = trained
    final, merged = tr.output_dir / "final", tr.output_dir / "final_merged"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    # Model cards on both: the adapter's loads through peft, the merged model through transformers.
    adapter_card, merged_card = ((d / "README.md").read_text() for d in (final, merged))
    assert "library_name: peft" in adapter_card and "AutoPeftModelForCausalLM" in adapter_card
    assert "library_name: transformers" in merged_card and "- lora" in merged_card
    assert cfg["base_model_name_or_path"] == tr.config.model.path
    assert sorted(cfg["target_modules"]) == sorted(jconfig.LORA_TARGETS)
    ids = np.asarray([tr.tokenizer("12+7=19")["input_ids"]], np.int32)
    want = np.asarray(lora.merged(tr.model())(ids))
    np.testing.assert_allclose(np.asarray(tr.model()(ids)), want, atol=1e-5)  # merging changes nothing
    base = AutoModelForCausalLM.from_pretrained(tr.config.model.path, dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, str(final)).eval()
        got = adapted(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        got_merged = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(plain - want).max() > 1e-3  # the adapters changed the logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_merged, want, atol=1e-4, rtol=1e-4)


def test_kv_cache_generation_runs_the_adapters(trained):
    from jdpo.scoring.generate import Generator, SamplingParams

    tr, _, _ = trained
    prompts = ["12+7=", "3+4=", "19+19="]
    merged = Generator(lora.merged(tr.model()), tr.tokenizer, mesh=tr.mesh, model_dir=tr.config.model.path)
    base = Generator(tr.model(lora.zero_like(tr.state.params)), tr.tokenizer, mesh=tr.mesh,
                     model_dir=tr.config.model.path)  # fmt: skip
    want = [g["tokens"] for g in merged.generate(prompts, SamplingParams())]
    assert [g["tokens"] for g in tr.generate(prompts)] == want
    # `jdpo generate` / `jdpo eval` given the adapter directory: its base with the adapter merged.
    loaded = Generator.from_pretrained(tr.output_dir / "final", mesh=tr.mesh)
    assert [g["tokens"] for g in loaded.generate(prompts, SamplingParams())] == want
    assert [g["tokens"] for g in base.generate(prompts, SamplingParams())] != want


def test_init_adapter_is_the_initial_policy_and_the_reference(trained, assets, tmp_path):
    tr, _, _ = trained
    cfg = make_config(assets, tmp_path / "run", **{"lora.init_adapter": str(tr.output_dir / "final")})
    cont = train.Trainer(cfg, mesh=one_device())
    for a, b in zip(
        jax.tree.leaves(host(tr.state.params)), jax.tree.leaves(host(cont.state.params)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    ids = np.asarray([tr.tokenizer("12+7=19")["input_ids"]], np.int32)
    np.testing.assert_array_equal(np.asarray(cont.model()(ids)), np.asarray(tr.model()(ids)))
    (first,) = steps(cont, 1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # never 0: reference == init adapter


def test_a_mismatching_init_adapter_is_refused_naming_the_key(trained, assets, tmp_path, monkeypatch):
    import shutil

    from safetensors.numpy import load_file, save_file

    tr, _, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(tr.output_dir / "final", bad)
    with pytest.raises(jconfig.ConfigError, match=r"has rank 4 but lora.rank is 2: set lora.rank"):
        train.Trainer(make_config(assets, tmp_path / "r", **{"lora.rank": 2, "lora.init_adapter": str(bad)}))
    weights = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    weights[key] = np.zeros((4, 48), np.float32)
    save_file(weights, bad / "adapter_model.safetensors")
    from jdpo.models import hf

    monkeypatch.setattr(hf, "_load_array", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(
        jconfig.ConfigError, match=rf"tensor {key} has shape \(4, 48\), the model's is \(4, 64\)"
    ):
        train.Trainer(
            make_config(assets, tmp_path / "s", **{"lora.init_adapter": str(bad)}), mesh=one_device()
        )


# Slow; in the default run scan_layers / remat equivalence itself is pinned without adapters in test_models.
@pytest.mark.slow
def test_scan_layers_and_remat_match_the_layer_loop(trained, assets, tmp_path):
    # From the same adapters (the layer loop and the scanned stack draw their random A differently).
    start = {"lora.init_adapter": str(trained[0].output_dir / "final")}
    loop = steps(train.Trainer(make_config(assets, tmp_path / "a", **start), mesh=one_device()), 2)
    over = {"model.scan_layers": True, "model.remat": "full", **start}
    scanned = steps(train.Trainer(make_config(assets, tmp_path / "b", **over), mesh=one_device()), 2)
    for a, b in zip(loop, scanned, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_the_dense_attention_kernel_gives_the_blocked_kernels_steps(trained, assets, tmp_path):
    # Adapters sit on the projections only, so every attention kernel carries them the same way.
    start = {"lora.init_adapter": str(trained[0].output_dir / "final")}
    blocked = steps(train.Trainer(make_config(assets, tmp_path / "a", **start), mesh=one_device()), 1)
    over = {"model.attention": "xla", **start}
    dense = steps(train.Trainer(make_config(assets, tmp_path / "b", **over), mesh=one_device()), 1)
    for a, b in zip(blocked, dense, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_lora_dropout_is_on_the_adapter_input_in_training_forwards_only():
    from flax import nnx

    from jdpo.models.transformer import Dense, LoRASpec

    spec = LoRASpec(rank=2, alpha=4.0, targets=("up_proj",), dropout=0.5).for_module("up_proj")
    dense = Dense(jax.random.key(0), (8,), (6,), ("embed", "mlp"), bias=False, param_dtype=np.float32,
                  std=0.1, lora=spec)  # fmt: skip
    dense.lora_b.set_value(jax.random.normal(jax.random.key(1), (2, 6)))
    x = jax.random.normal(jax.random.key(2), (3, 5, 8))
    key = jax.random.key(3)
    w, a, b = (np.asarray(v.get_value()) for v in (dense.kernel, dense.lora_a, dense.lora_b))
    kept = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, spec.site), 0.5, (15, 8)))
    xm = np.asarray(x).reshape(15, 8)
    want = xm @ w + (np.where(kept, xm / 0.5, 0) @ a @ b) * 2.0  # the base path sees every input
    got = np.asarray(dense(x, np.float32, key)).reshape(15, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < kept.mean() < 1
    no_key = np.asarray(dense(x, np.float32)).reshape(15, 6)  # reference / eval / generation forwards
    np.testing.assert_allclose(no_key, xm @ w + xm @ a @ b * 2.0, rtol=1e-5, atol=1e-6)
    assert isinstance(dense.lora_a, nnx.LoRAParam)


def test_lora_dropout_changes_the_adapter_gradient(assets, tmp_path):
    # Reproducibility (the masks from the checkpointed step RNG) is pinned by the resume test.
    plain = steps(train.Trainer(make_config(assets, tmp_path / "plain"), mesh=one_device()), 1)[0]
    cfg = make_config(assets, tmp_path / "dropout", **{"lora.dropout": 0.5})
    first = steps(train.Trainer(cfg, mesh=one_device()), 1)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: dropout on x A changes nothing yet
    assert first["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3)  # but d/dB sees dropped inputs


# slow (35 s): sharded forwards are covered fast by test_sharding.py::test_sharded_model_matches_one_device.
@pytest.mark.slow
def test_eight_device_fsdp_mesh_matches_one_device(assets, tmp_path):
    # With LoRA dropout (its masks do not depend on the sharding: jax's partitionable threefry) on an
    # nf4 base (codes and block scales sharded like the kernels they replace).
    over = {"lora.dropout": 0.2, "lora.quantize": "nf4"}
    one = steps(train.Trainer(make_config(assets, tmp_path / "one", **over), mesh=one_device()), 3)
    eight = train.Trainer(make_config(assets, tmp_path / "eight", **over), mesh=make_mesh(1, 8, 1))
    assert max(len(x.sharding.device_set) for x in jax.tree.leaves(eight.state.base)) == 8
    codes = [x for x in jax.tree.leaves(eight.state.base) if x.dtype == np.uint8]
    assert codes and max(len(x.sharding.device_set) for x in codes) == 8
    for a, b in zip(one, steps(eight, 3), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


# slow (18 s): the plan's adapter count is covered fast by tests/test_models_families.py's phi3 plan test.
@pytest.mark.slow
def test_plan_counts_a_lora_run_of_llama3_8b():
    from jdpo.commands import plan
    from jdpo.models import ModelConfig

    llama3_8b = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    })  # fmt: skip
    over = {"model.path": "x", "model.param_dtype": "bfloat16", "lora.rank": 16, "dpo.reference": "online"}
    p = plan.plan_memory(llama3_8b, jconfig.replace(jconfig.Config(), **over), num_devices=1)
    rows = {name: size for name, size, _ in p.rows}
    adapters = 41_943_040  # 16 x (in + out) of the 7 projections x 32 layers: PEFT's count for r=16
    assert rows["base (frozen)"] == 8_030_261_248 * 2 and rows["adapters"] == adapters * 2
    assert rows["gradients"] == adapters * 4 and 0 <= rows["optimizer"] - adapters * 2 * 2 < 64
    assert rows["reference params"] == adapters * 2  # no second copy of the base
    int8 = plan.plan_memory(
        llama3_8b, jconfig.replace(jconfig.Config(), **over, **{"lora.quantize": "int8"}), num_devices=1
    )
    projections, scales = 6_979_321_856, 32 * 43_008  # the 7 kernels of 32 layers; one scale per output
    want = projections + scales * 4 + (8_030_261_248 - projections) * 2
    assert {name: size for name, size, _ in int8.rows}["base (frozen)"] == want
    nf4 = plan.plan_memory(
        llama3_8b, jconfig.replace(jconfig.Config(), **over, **{"lora.quantize": "nf4"}), num_devices=1
    )
    # Two codes per byte plus a float32 absmax per 64 weights: 4.5 bits per projection weight.
    want = projections // 2 + projections // 64 * 4 + (8_030_261_248 - projections) * 2
    assert {name: size for name, size, _ in nf4.rows}["base (frozen)"] == want


# Per-channel int8 rounds each weight by at most half a step (absmax / 254); nf4 by up to half the
# widest gap of its table (0.14 of each 64-weight block's absmax; 0.07 of it on average for Gaussian
# weights), so its logits move more. Measured on this model: int8 0.23%, nf4 2.8% of max |logit|.
# nf4 is slow (21 s): its codes and blocks are covered fast by tests/test_quantize.py, the layer path by int8.
@pytest.mark.parametrize(
    "kind, tolerance, dtype",
    [("int8", 0.01, np.int8), pytest.param("nf4", 0.06, np.uint8, marks=pytest.mark.slow)],
)
def test_quantised_base_logits_are_close_to_full_precision(assets, kind, tolerance, dtype):
    from jdpo.models import ModelOptions, from_pretrained
    from jdpo.models.transformer import LoRASpec

    ids = np.arange(1, 40, dtype=np.int32)[None]
    full, _ = from_pretrained(assets.model_dir)
    want = np.asarray(full(ids))
    spec = LoRASpec(rank=4, alpha=8.0, targets=jconfig.LORA_TARGETS, quantize=kind)
    for scan in (False, True) if kind == "nf4" else (False,):  # the stacked layout once
        q, _ = from_pretrained(assets.model_dir, options=ModelOptions(scan_layers=scan, lora=spec))
        projections = lora.dense_modules(q, adapted=False)  # the 7 projections of each layer + lm_head
        assert sum(m.kernel.get_value().dtype == dtype for m in projections.values()) == 7 * (
            1 if scan else 2
        )
        got = np.asarray(q(ids))
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"{kind} scan={scan}: max |logit error| / max |logit| = {err:.4f}")
        assert err <= tolerance
        np.testing.assert_array_equal(np.asarray(lora.merged(q)(ids)), got)  # B = 0: merging adds 0


# slow (26 s): a QLoRA run is covered fast by
# test_a_qlora_export_says_the_adapter_on_the_full_precision_base_differs.
@pytest.mark.slow
def test_quantised_runs_start_at_ln2_on_a_smaller_base_that_stays_bitwise(assets, tmp_path):
    plain = nbytes(train.Trainer(make_config(assets, tmp_path / "plain"), mesh=one_device()).state.base)
    for kind, share in (("int8", 0.6), ("nf4", 0.35)):
        cfg = make_config(assets, tmp_path / kind, **{"lora.quantize": kind})
        tr = train.Trainer(cfg, mesh=one_device())
        print(f"{kind}: base {nbytes(tr.state.base)} bytes, unquantised {plain}")
        assert nbytes(tr.state.base) < share * plain
        base = host(tr.state.base)
        first, second = steps(tr, 2)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert second["loss"] != pytest.approx(math.log(2), abs=1e-6)
        jax.tree.map(np.testing.assert_array_equal, host(tr.state.base), base)


def test_a_qlora_export_says_the_adapter_on_the_full_precision_base_differs(trained, assets, tmp_path):
    """Issue 31, smaller messages: QLoRA's PEFT final/ applied to the full-precision base differs from
    final_merged/ (up to 0.2 in logits with nf4); the export's model card says so, a plain LoRA's does not."""
    over = {"lora.quantize": "nf4", "train.max_steps": 1}
    tr = train.Trainer(make_config(assets, tmp_path / "run", **over), mesh=one_device())
    tr.fit()
    card = (tr.output_dir / "final" / "README.md").read_text()
    assert "trained on the base quantised to nf4 (QLoRA)" in card
    assert "final_merged/" in card and "full-precision base" in card
    assert card.startswith("---\n") and "library_name: peft" in card  # the model card holds the note
    plain = (trained[0].output_dir / "final" / "README.md").read_text()
    assert "library_name: peft" in plain and "QLoRA" not in plain
