"""`jdpo plan` with the context axis: its activation estimate (activations, the context k / v, the
log-prob chunk) against XLA's compiled memory statistics of the same forward + backward on the CPU, at
context 1 and 4; the longest row that fits grows with the context axis and with `remat: offload`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_plan import LLAMA3_8B

from jdpo import config as C
from jdpo.commands import plan
from jdpo.data.batch import Batch
from jdpo.models import ModelConfig, ModelOptions, Transformer
from jdpo.parallel.sharding import make_mesh
from jdpo.scoring.forward import pair_logprobs

SMALL = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)  # fmt: skip


def _row(T: int) -> Batch:
    """One row of 4 pairs (8 segments of T / 8), the second half of each scored."""
    n = T // 8
    ids = np.random.default_rng(0).integers(3, 256, (1, T)).astype(np.int32)
    seg = np.repeat(np.arange(1, 9, dtype=np.int32), n)[None]
    pos = np.tile(np.arange(n, dtype=np.int32), 8)[None]
    targets = np.where(np.roll(seg, -1) == seg, np.roll(ids, -1), 0).astype(np.int32)
    mask = ((pos >= n // 2) & (targets > 0)).astype(np.float32)
    return Batch(ids, pos, seg, targets, mask, np.arange(4, dtype=np.int32)[None])


def _compiled_temp(config, T: int, context: int) -> int:
    options = ModelOptions(attention="blocked", context=context)
    graphdef, params = nnx.split(Transformer(config, options=options, rngs=nnx.Rngs(0)))

    def loss(params, batch):
        out = pair_logprobs(nnx.merge(graphdef, params), batch)
        return jnp.sum(out["chosen"] - out["rejected"])

    mesh = make_mesh(context=context, devices=jax.devices()[:context])
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss)).lower(params, _row(T).on_mesh(mesh)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _estimate(config, T: int, context: int) -> int:
    over = {"model.dtype": "float32", "model.attention": "blocked", "train.batch_rows": 1,
            "data.row_length": T, "mesh.fsdp": 1, "mesh.context": context}  # fmt: skip
    p = plan.plan_memory(config, C.replace(C.Config(), **over), num_devices=context, on_cpu=True)
    parts = ("activations", "log-prob chunk") + (("context k / v",) if context > 1 else ())
    return sum(p.part(name) for name in parts)


# Two compiles (~20 s); the plan's arithmetic is test_plan::test_context_axis_and_offload_by_hand.
@pytest.mark.slow
def test_activation_estimate_against_xla_compiled_memory():
    config, T = ModelConfig.from_hf(SMALL), 1024
    compiled = {c: _compiled_temp(config, T, c) for c in (1, 4)}
    estimate = {c: _estimate(config, T, c) for c in (1, 4)}
    for c in (1, 4):
        # The plan counts the saved tensors; XLA's temporaries add the gradients' and the kernel's
        # working buffers on top, within a factor of 2.5 here.
        assert 0.4 * compiled[c] <= estimate[c] <= 1.1 * compiled[c], (c, estimate[c], compiled[c])
    # Both shrink with the split: a device holds a quarter of the row.
    assert compiled[4] < 0.5 * compiled[1] and estimate[4] < 0.5 * estimate[1]


@pytest.mark.slow  # ~30 plans of an 8B model (~15 s); `jdpo plan` prints it in test_plan::test_cli
def test_longest_row_grows_with_context_and_offload():
    config = ModelConfig.from_hf(LLAMA3_8B)
    h100 = plan.DEVICE_MEMORY["h100"]
    # One row per device: 8 rows over fsdp 8 at context 1, 2 rows over fsdp 2 at context 4.
    base = {"model.param_dtype": "bfloat16", "lora.rank": 16, "lora.alpha": 32.0, "data.row_length": 4096}
    longest, step = {}, 16384
    for context, remat in ((1, "full"), (4, "full"), (4, "offload")):
        over = {**base, "mesh.context": context, "model.remat": remat, "train.batch_rows": 8 // context}
        longest[context, remat] = plan.longest_row(
            config, C.replace(C.Config(), **over), num_devices=8, device_bytes=h100, backend="gpu", step=step
        )
    assert 0 < longest[1, "full"] < longest[4, "full"] < longest[4, "offload"]
    assert longest[4, "full"] % step == 0
    over = {**base, "mesh.context": 4, "model.remat": "full", "train.batch_rows": 2}
    for T, fit in ((longest[4, "full"], True), (longest[4, "full"] + step, False)):
        cfg = C.replace(C.Config(), **{**over, "data.row_length": T})
        assert plan.fits(plan.plan_memory(config, cfg, num_devices=8, backend="gpu"), h100) is fit
