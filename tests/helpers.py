"""Shared test set-up: tiny models.

    from helpers import tiny_hf_config, random_model  # tests/ is on sys.path under pytest
    hf = tiny_hf_config("gemma2", vocab_size=320)     # a config.json dict: hidden 32, 2 layers, 4 heads
    model = random_model(ModelConfig.from_hf(hf))     # numpy-random weights, no RNG compiles

Nothing heavy is imported at module level: tests/multihost_worker.py imports this module before it sets
its device count. The BPE tokenizer is in helpers_tokenizer.py, the jaxpr walk in helpers_jaxpr.py.
"""

from __future__ import annotations

from typing import Any

# A tiny config.json per family. Heads (4 / 2 kv), vocab (128) and mlp (64) divide by tensor=2, embed (32)
# by fsdp=8. gemma2: a window of 3 on alternating local/global layers, both soft-caps, the tanh GELU.
TINY_HF_SIZES = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
TINY_HF_FAMILIES = {
    "llama": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gemma2": dict(
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=3,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "qwen3": dict(num_key_value_heads=1, head_dim=8, tie_word_embeddings=True),
}


def tiny_hf_config(family: str, **overrides: Any) -> dict:
    """The tiny HF config.json dict of `family` (a key of TINY_HF_FAMILIES); `overrides` win."""
    return {"model_type": family, **TINY_HF_FAMILIES[family], **TINY_HF_SIZES, **overrides}


def random_model(config, *, seed: int = 0, scale: float = 0.1, scan_layers: bool = False):
    """A Transformer of `config` with numpy-random parameters: N(0, scale^2), norm weights near 1 (or near
    0 where the family adds 1, as gemma's do) so activations stay sane.

    Filled from numpy rather than `init_model` because compiling jax's RNG for every parameter shape
    dominates the runtime of these tiny tests; `init_model` has its own tests in test_sharding.py.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jdpo.models import ModelOptions, Transformer

    options = ModelOptions(scan_layers=scan_layers)
    model = nnx.eval_shape(lambda: Transformer(config, options=options, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            x = v.get_value()
            value = scale * rng.standard_normal(x.shape)
            if path[-1] == "weight" and not config.norm_offset:
                value += 1.0
            v.set_value(jnp.asarray(value, x.dtype))
    return model
