"""`model.remat: offload`: each decoder layer's input saved in pinned host memory (JAX's offload
checkpoint policy), the rest recomputed. On the CPU the program compiles and runs (host and device
memory are the same RAM, so XLA:CPU has no copy to make) and its gradients equal those without remat;
the offload itself is visible in the gradient's jaxpr as the layer inputs stacked in host memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config

from jdpo.models import ModelConfig


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_offload_gradients_equal_no_remat_and_save_layer_inputs_on_the_host(scan_layers):
    config = ModelConfig.from_hf(tiny_hf_config("llama"))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 32)), jnp.int32)
    grads, jaxprs = {}, {}
    for remat in ("none", "offload"):
        graphdef, params = nnx.split(random_model(config, scan_layers=scan_layers, remat=remat))

        def loss(params, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params)(ids) ** 2) * 1e-3

        grads[remat] = jax.jit(jax.grad(loss))(params)
        jaxprs[remat] = str(jax.make_jaxpr(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads["offload"]), jax.tree.leaves(grads["none"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The layer inputs [B, T, D] (stacked [L, B, T, D] under the scan) live in host memory.
    D, L = config.hidden_size, config.num_layers
    host = f"f32<host>[{L},2,32,{D}]" if scan_layers else f"f32<host>[2,32,{D}]"
    assert host in jaxprs["offload"] and "<host>" not in jaxprs["none"]
