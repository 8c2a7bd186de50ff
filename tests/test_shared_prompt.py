"""The shared-prompt layout (`data.shared_prompt`): a pair's prompt once, its chosen and rejected
branches after it. Its per-pair log-probs and their gradients are those of the plain layout (each
completion after its own copy of the prompt) on both kernels that run it; which runs take it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config

from jdpo.data import TokenizedPairs, make_batch
from jdpo.models import ModelConfig
from jdpo.scoring.forward import pair_logprobs


def pairs_of(n, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    mk = lambda lo, hi: rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).astype(np.int32)  # noqa: E731
    prompts = [np.concatenate([[1], mk(0, 20)]).astype(np.int32) for _ in range(n)]
    prompts[1] = prompts[1][:1]  # BOS alone: nothing is shared
    chosen = [np.concatenate([mk(1, 12), [2]]).astype(np.int32) for _ in range(n)]
    rejected = [np.concatenate([mk(1, 12), [2]]).astype(np.int32) for _ in range(n)]
    return TokenizedPairs(prompts, chosen, rejected, np.arange(n))


@pytest.mark.parametrize("attention", ["blocked", "xla"])
def test_same_logprobs_and_gradients_as_the_plain_layout(attention):
    config = ModelConfig.from_hf(tiny_hf_config("llama"))
    model = random_model(config, attention=attention, attention_block=8)  # tiles smaller than a prompt
    graphdef, params = nnx.split(model)
    pairs = pairs_of(7)
    rows = [[0, 1, 2], [3, 4], [5, 6], []]

    def loss(params, batch):
        out = pair_logprobs(nnx.merge(graphdef, params), batch)
        weights = jnp.arange(1.0, 1.0 + out["chosen"].size).reshape(out["chosen"].shape)
        return jnp.sum(weights * (out["chosen"] - 0.5 * out["rejected"])), out

    results = {}
    for shared in (False, True):
        batch = make_batch(pairs, rows, 224, 3, shared_prompt=shared)
        batch = jax.tree.map(jnp.asarray, batch)
        results[shared] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
    (l_plain, out_plain), g_plain = results[False]
    (l_shared, out_shared), g_shared = results[True]
    for key in out_plain:
        np.testing.assert_allclose(out_shared[key], out_plain[key], rtol=1e-5, atol=1e-5)
    assert np.asarray(out_plain["chosen_counts"]).sum() > 0
    np.testing.assert_allclose(l_shared, l_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_which_runs_share_the_prompt():
    """auto: on with blocked and xla on a model without a sliding window, off (with the reason) on
    splash, pallas_gpu or gemma2's window; true where it cannot run is refused, naming the field."""
    from jdpo.config import ConfigError
    from jdpo.models.kernels import shares_prompt

    llama = ModelConfig.from_hf(tiny_hf_config("llama"))
    gemma2 = ModelConfig.from_hf(tiny_hf_config("gemma2"))
    assert shares_prompt("auto", "blocked", llama)[0] and shares_prompt("true", "xla", llama)[0]
    assert not shares_prompt("false", "blocked", llama)[0]
    cases = [("splash", llama, "splash attention kernel"), ("pallas_gpu", llama, "pallas_gpu"),
             ("blocked", gemma2, "sliding_window=3")]  # fmt: skip
    for kernel, model, why in cases:
        on, reason = shares_prompt("auto", kernel, model)
        assert not on and why in reason
        with pytest.raises(ConfigError, match=f"data.shared_prompt=true cannot run here: .*{why}"):
            shares_prompt("true", kernel, model)


def test_a_run_lays_out_its_pairs_by_its_setting(assets, tmp_path):
    """Two runs on the same model and data, the prompt shared and not: the same per-pair log-probs over
    the eval split through the run's own batches, fewer tokens in its rows, separate reference cache
    entries; a kernel without the shared-prefix rule is refused before the model loads."""
    from helpers import one_device, run_config

    from jdpo.config import ConfigError
    from jdpo.train import trainer as train

    runs = {}
    for setting in ("auto", "false"):
        cfg = run_config(assets, tmp_path / setting, **{"data.shared_prompt": setting, "train.max_steps": 1})
        runs[setting] = train.Trainer(cfg, mesh=one_device())
    shared, plain = runs["auto"], runs["false"]
    assert shared.data.layout.shared_prompt and not plain.data.layout.shared_prompt
    a, b = shared.logprobs(shared.data.eval_pairs), plain.logprobs(plain.data.eval_pairs)
    np.testing.assert_allclose(a.chosen, b.chosen, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.rejected, b.rejected, rtol=1e-5, atol=1e-5)
    tokens = {k: sum(int((np.asarray(x.segment_ids) != 0).sum()) for x in r.data.one_pass(r.data.eval_pairs))
              for k, r in runs.items()}  # fmt: skip
    assert tokens["auto"] < tokens["false"]
    assert shared.reference.keys["train"] != plain.reference.keys["train"]
    bad = run_config(
        assets, tmp_path / "splash", **{"data.shared_prompt": "true", "model.attention": "splash"}
    )
    with pytest.raises(ConfigError, match="data.shared_prompt=true cannot run here"):
        train.Trainer(bad, mesh=one_device())
