"""Shared test set-up: tiny models, the tiny demo task, config builders and the one-device mesh.

    from helpers import tiny_hf_config, random_model  # tests/ is on sys.path under pytest
    hf = tiny_hf_config("gemma2", vocab_size=320)     # a config.json dict: hidden 32, 2 layers, 4 heads
    model = random_model(ModelConfig.from_hf(hf))     # numpy-random weights, no RNG compiles
    assets = build_tiny_assets(d, max_operand=9, eval_pairs=20)  # demo task + a random tiny model
    cfg = tiny_config(assets, **{"train.max_steps": 2})          # a Config that trains on it
    cfg = run_config(assets, out)  # + output dir, reference cache beside it, lr 1e-3, no console
    out = modules_imported_by("import jdpo.cli", ["jax"])  # "[]": a fresh interpreter did not load jax

The session-wide `assets` fixture (conftest.py) is `build_tiny_assets` of the size most tests train on.
Nothing heavy is imported at module level: tests/multihost_worker.py imports this module before it sets
its device count. The BPE tokenizer is in helpers_tokenizer.py, the jaxpr walk in helpers_jaxpr.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
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

# The random model of the demo task's assets (`build_tiny_assets`): jdpo.demo.make_model_dir sizes.
TINY_DEMO_MODEL = dict(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=128
)


def tiny_hf_config(family: str, **overrides: Any) -> dict:
    """The tiny HF config.json dict of `family` (a key of TINY_HF_FAMILIES); `overrides` win."""
    return {"model_type": family, **TINY_HF_FAMILIES[family], **TINY_HF_SIZES, **overrides}


def random_model(config, *, seed: int = 0, scale: float = 0.1, scan_layers: bool = False, **options: Any):
    """A Transformer of `config` with numpy-random parameters: N(0, scale^2), norm weights near 1 (or near
    0 where the family adds 1, as gemma's do) so activations stay sane.

    Filled from numpy rather than `init_model` because compiling jax's RNG for every parameter shape
    dominates the runtime of these tiny tests; `init_model` has its own tests in test_sharding.py.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jdpo.models import ModelOptions, Transformer

    options = ModelOptions(scan_layers=scan_layers, **options)  # e.g. attention=
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


def build_tiny_assets(directory, *, max_operand: int, eval_pairs: int, seed: int = 0):
    """`jdpo.demo.build_assets` with the tiny model (TINY_DEMO_MODEL): the a+b task's train / eval JSONL
    (`eval_pairs` held out of the (max_operand + 1)^2 sums), its tokenizer and a random model."""
    from jdpo import demo

    return demo.build_assets(
        directory, max_operand=max_operand, eval_pairs=eval_pairs, seed=seed, **TINY_DEMO_MODEL
    )


def tiny_config(assets, **overrides: Any):
    """A float32 Config that trains on `assets` (anything with model_dir, train_path and eval_path; no
    eval split when eval_path is None): pairs of at most 16 tokens (prompt 8) packed in rows of 48, 8 rows
    a step. `overrides` are dotted field names, as `jdpo.config.replace` takes them."""
    from jdpo import config as jconfig

    base = {
        "model.path": str(assets.model_dir),
        "model.dtype": "float32",
        "data.train": [str(assets.train_path)],
        "data.eval": [str(assets.eval_path)] if assets.eval_path else [],
        "data.max_length": 16,
        "data.max_prompt_length": 8,
        "data.row_length": 48,
        "train.batch_rows": 8,
    }
    return jconfig.replace(jconfig.Config(), **{**base, **overrides})


def run_config(assets, out, **overrides: Any):
    """`tiny_config` of a training run in `out`: the reference cache beside it (out/../refcache), learning
    rate 1e-3, nothing on the console or in TensorBoard."""
    base = {
        "dpo.cache_dir": str(out.parent / "refcache"),
        "optim.learning_rate": 1e-3,
        "train.output_dir": str(out),
        "logging.console": False,
        "logging.tensorboard": False,
    }
    return tiny_config(assets, **{**base, **overrides})


def one_device():
    """A data=fsdp=tensor=1 mesh on the first of the simulated CPU devices: the single-device reference."""
    import jax

    from jdpo.parallel.sharding import make_mesh

    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


#: Logged keys that measure the machine, not the run: left out when two runs' metrics are compared.
TIMING = frozenset({"step_time", "tokens_per_sec", "mfu"})


def logged_records(path, *, timing=TIMING) -> list[dict]:
    """The records of a run's metrics.jsonl without the `timing` keys (equal for runs that computed the
    same)."""
    from jdpo.report import metrics

    return [{k: v for k, v in r.items() if k not in timing} for r in metrics.read_metrics(path)]


def adapter_gradients(model, ids_BxT, mask_BxT):
    """(the gradients of a toy log-likelihood over `mask_BxT` with respect to a LoRA model's adapters, the
    frozen rest of its state) as `nnx.State`s: what reaches the adapters, and what the step leaves out."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    ids, mask = jnp.asarray(ids_BxT), jnp.asarray(mask_BxT)

    def loss(adapters, base):
        logits = nnx.merge(graphdef, adapters, base)(ids, segment_ids_BxT=mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * mask)

    return jax.grad(loss)(adapters, base), base


def train_steps(trainer, n):
    """Run n optimizer steps of a `jdpo.train.trainer.Trainer` by hand; returns each step's metrics as floats."""
    import jax

    out = []
    for _ in range(n):
        batch, _ = trainer.next_step_batches()
        trainer.state, m = trainer.steps.train_step(trainer.state, batch)
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return out


def modules_imported_by(statement: str, modules: Iterable[str]) -> str:
    """Which of `modules` a fresh interpreter has loaded after running `statement`: the printed list."""
    code = f"import sys; {statement}; print([m for m in {tuple(modules)!r} if m in sys.modules])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
