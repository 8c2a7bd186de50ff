"""Training with rows split over the mesh's context axis (`mesh.context: 4`, fsdp 2 on the 8 simulated
devices): a three-step run's metrics equal one device's, full fine-tuning and LoRA; the reference pass
and eval run on the context mesh; a resume on the same mesh is bit-identical; bad settings are refused
before the model loads with the numbers that would work."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import logged_records, one_device, run_config
from helpers import train_steps as steps
from test_train import assert_close_metrics

from jdpo import config as jconfig
from jdpo.config import ConfigError
from jdpo.train import trainer as train

# Rows of 64 tokens: 2 x context = 8 chunks of 8, pairs of up to 16 + 16 tokens straddle them.
CONTEXT = {"mesh.context": 4, "data.row_length": 64, "train.max_steps": 3, "train.log_every": 1}


def _config(assets, out, **over):
    return run_config(assets, out, **{**CONTEXT, **over})


LORA = {"lora.rank": 4, "lora.alpha": 8.0}
KTO_QLORA = {**LORA, "lora.quantize": "nf4", "dpo.loss_type": ["kto"], "dpo.beta": 0.5}


@pytest.mark.slow  # ~30 s each on 2 cores; the forward and its gradients: tests/test_context.py
@pytest.mark.parametrize("over", [{}, LORA, KTO_QLORA], ids=["full", "lora", "kto_qlora"])
def test_three_steps_with_context_4_equal_one_device(assets, tmp_path, over):
    one = train.Trainer(_config(assets, tmp_path / "one", **{**over, "mesh.context": 1}), mesh=one_device())
    ctx = train.Trainer(_config(assets, tmp_path / "ctx", **over, **{"dpo.cache_dir": str(tmp_path / "c")}))
    assert not any(ctx.reference.reused.values())
    assert dict(ctx.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 1, "context": 4}
    assert ctx.attention[0] == "blocked"
    assert ctx.data.layout.balance is not None  # model.context_balance auto: rows dealt in blocks
    # The reference pass ran on the context mesh: the same cached log-probs as one device's.
    for split in ("train", "eval"):
        a, b = one.reference.logps[split], ctx.reference.logps[split]
        np.testing.assert_allclose(b.chosen, a.chosen, rtol=1e-5, atol=1e-5)
    for a, b in zip(steps(one, 3), steps(ctx, 3), strict=True):
        assert_close_metrics(a, b)
    e1, e2 = one.evaluate(), ctx.evaluate()
    assert e2["eval/loss"] == pytest.approx(e1["eval/loss"], rel=1e-5)
    # Sampling (the KV cache, never split) on the context mesh: the same greedy completions.
    prompts = ["3+4=", "12+7="]
    assert [g["completion"] for g in ctx.generate(prompts)] == [
        g["completion"] for g in one.generate(prompts)
    ]


@pytest.mark.slow
def test_resume_on_a_context_mesh_is_bit_identical(assets, tmp_path):
    over = {"train.max_steps": 4, "train.save_every": 2, "train.export": False}
    full = train.run(_config(assets, tmp_path / "full", **over))
    cfg = _config(assets, tmp_path / "resumed", **over)
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 2])
    assert first.step == 2
    result = train.Trainer(cfg).fit()
    assert result.step == 4
    assert logged_records(result.metrics_path) == logged_records(full.metrics_path)


def test_bad_context_settings_are_refused_before_the_model_loads(assets, tmp_path):
    base = _config(assets, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.row_length = 60 .* multiple of 2 x context = 8.* 56 or 64"):
        jconfig.validate(jconfig.replace(base, **{"data.row_length": 60}))
    with pytest.raises(ConfigError, match="model.attention=xla cannot run rows split over mesh.context=4"):
        jconfig.validate(jconfig.replace(base, **{"model.attention": "xla"}))
    for kernel in ("splash", "pallas_gpu"):
        gather = {"model.attention": kernel, "model.context_attention": "all_gather"}
        with pytest.raises(ConfigError, match=f"{kernel} runs a context-split row in the ring only"):
            jconfig.validate(jconfig.replace(base, **gather))
        jconfig.validate(jconfig.replace(base, **{"model.attention": kernel}))  # the ring with the kernel
    dealt_ring = {"model.context_balance": "blocks", "model.context_attention": "ring"}
    with pytest.raises(ConfigError, match="context_balance=blocks .*context_attention=ring: rows dealt"):
        jconfig.validate(jconfig.replace(base, **dealt_ring))
    with pytest.raises(ConfigError, match="mesh.context=4 with mesh.expert=2: the expert exchange"):
        jconfig.validate(jconfig.replace(base, **{"mesh.expert": 2, "mesh.data": 1, "mesh.fsdp": 1}))
    bad = jconfig.replace(
        base, **{"model.path": str(tmp_path / "absent"), "mesh.context": 3, "data.row_length": 48}
    )
    with pytest.raises(ConfigError, match=r"mesh.context=3: .* leave 8: mesh.context may be 1, 2, 4, 8"):
        train.Trainer(bad)  # the mesh is made first: no model was looked for
    assert jax.device_count() == 8


def test_kto_with_qlora_on_a_context_mesh_equals_one_device(assets, tmp_path):
    """Issue 27's combinations on context 4 x fsdp 2: unpaired (KTO) data and a QLoRA (nf4) base with
    adapters: the reference pass and the eval pass equal one device's (their training steps:
    test_three_steps_with_context_4_equal_one_device[kto_qlora], slow)."""
    over = {
        "dpo.loss_type": ["kto"], "dpo.beta": 0.5, "lora.rank": 4, "lora.alpha": 8.0, "lora.quantize": "nf4",
        "train.max_steps": 1,
    }  # fmt: skip
    one_cfg = _config(
        assets, tmp_path / "one", **over, **{"mesh.context": 1, "dpo.cache_dir": str(tmp_path / "c1")}
    )
    one = train.Trainer(one_cfg, mesh=one_device())
    ctx = train.Trainer(_config(assets, tmp_path / "ctx", **over, **{"dpo.cache_dir": str(tmp_path / "c4")}))
    assert dict(ctx.mesh.shape)["context"] == 4 and not any(ctx.reference.reused.values())
    for split in ("train", "eval"):
        a, b = one.reference.logps[split], ctx.reference.logps[split]
        np.testing.assert_allclose(b.chosen, a.chosen, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.rejected, a.rejected, rtol=1e-5, atol=1e-5)
    e1, e2 = one.evaluate(), ctx.evaluate()
    assert e2["eval/loss"] == pytest.approx(e1["eval/loss"], rel=1e-5)


# ~24 s on 2 cores: the eval pass on a context mesh is
# test_kto_with_qlora_on_a_context_mesh_equals_one_device's, `jdpo eval` itself tests/test_evaluate.py's.
@pytest.mark.slow
def test_jdpo_eval_of_rated_data_on_a_context_mesh_equals_one_device(assets, tmp_path):
    """`jdpo eval` (`--mesh 1,2,1,4`) of unpaired (KTO) records: its rows are fitted to the data and run
    whole on each context group where they do not split; the metrics equal one device's."""
    from test_train_unpaired import write_unpaired

    from jdpo.commands import evaluate
    from jdpo.parallel.sharding import make_mesh

    rated = write_unpaired(tmp_path / "rated.jsonl", [True, False, True, True, False])
    dpo = jconfig.replace(jconfig.Config(), **{"dpo.loss_type": ["kto"], "dpo.beta": 0.5}).dpo
    kw = dict(num_samples=2, max_new_tokens=3, max_length=16, max_prompt_length=8, dpo=dpo)
    model = str(assets.model_dir)
    m1 = evaluate.evaluate(model, model, rated, mesh=one_device(), **kw)["metrics"]
    m4 = evaluate.evaluate(model, model, rated, mesh=make_mesh(fsdp=2, context=4), **kw)["metrics"]
    assert m4.keys() == m1.keys() and m4["eval/count/chosen"] == 3
    for k, v in m1.items():
        assert m4[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
