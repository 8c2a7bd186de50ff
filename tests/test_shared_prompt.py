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
from jdpo.forward import pair_logprobs
from jdpo.models import ModelConfig


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
