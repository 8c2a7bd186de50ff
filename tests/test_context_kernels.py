"""The accelerator kernels inside the context ring (`mesh.context` > 1), in Pallas' interpret mode on the
8 CPU devices: Splash attention and jdpo's Pallas GPU flash kernel (`jdpo.models.flash_gpu`) as each ring
step's kernel (`jdpo.models.ring_pallas`) equal dense masked attention in values and the gradients of
q, k, v on packed rows with the shared prompt and grouped-query heads, and with a sliding window and
soft-capping; per-pair log-probs of a model at context 4 equal one device's, and so do two training
steps with splash (slow); the kernel choice on a context mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config
from helpers_attention import dense_reference
from test_shared_prompt import pairs_of

from jdpo.config import ConfigError
from jdpo.data import make_batch
from jdpo.models import ModelConfig
from jdpo.models.context_attention import context_attention
from jdpo.models.kernels import resolve_attention, shares_prompt
from jdpo.models.masks import AttentionMask
from jdpo.parallel import context_layout
from jdpo.parallel.sharding import make_mesh
from jdpo.scoring.forward import pair_logprobs


def _ring_vs_dense(seg, *, N, K, H, mesh_shape, kernel, scale=0.3, softcap=None, window=None, traced=False):
    B, T = seg.shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K))
    real = jnp.asarray(seg != 0)[..., None, None]
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) * real
    seg = jnp.asarray(seg)

    def dense(q, k, v):
        return jnp.sum(dense_reference(q, k, v, seg, scale=scale, softcap=softcap, window=window) * w)

    def split(q, k, v):  # the kernel takes the balanced layout (device i: chunks i and 2C - 1 - i)
        q, k, v, ids = (context_layout.to_balanced(x) for x in (q, k, v, seg))
        win = jnp.asarray(window, jnp.int32) if traced else window
        out = context_attention(
            q, k, v, AttentionMask(ids, window=win), scale=scale, softcap=softcap, block=128, how="ring",
            kernel=kernel, sliding_window=window,
        )  # fmt: skip
        return jnp.sum(context_layout.from_balanced(out) * w)

    want, want_g = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, k, v)
    with jax.set_mesh(make_mesh(**mesh_shape)):
        got, got_g = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
def test_pallas_ring_equals_dense_attention_with_shared_prompt_and_gqa(kernel):
    """context 4 x fsdp 2: segments straddle every chunk boundary, a shared prefix (-1) and its two
    branches, a plain pair, padding; 4 query heads over 2 kv heads."""
    B, T = 2, 64
    seg = np.zeros((B, T), np.int32)
    seg[0, :10], seg[0, 10:30], seg[0, 30:50], seg[0, 50:60] = -1, 1, 2, 3
    seg[1, :40], seg[1, 40:] = 1, 2
    _ring_vs_dense(seg, N=4, K=2, H=8, mesh_shape=dict(fsdp=2, context=4), kernel=kernel)


@pytest.mark.parametrize(
    "kernel, traced",
    # the static window is slow (10 s): the traced one reaches the same masks through `sliding_window`
    [pytest.param("splash", False, marks=pytest.mark.slow), ("splash", True), ("pallas_gpu", True)],
    ids=["splash_static_window", "splash_traced_window", "pallas_gpu_traced_window"],
)
def test_pallas_ring_equals_dense_attention_with_window_and_softcap(kernel, traced):
    """context 8 (chunks of 4): a window of 11 reaches back over two chunk boundaries, so key chunks are
    diagonal, partly and wholly inside the window and wholly outside it; soft-capped scores, one kv head
    (multi-query). Traced: the window as a layer scan passes it (`sliding_window` names it)."""
    B, T = 1, 64
    seg = np.zeros((B, T), np.int32)
    seg[0, :37], seg[0, 37:61] = 1, 2
    _ring_vs_dense(
        seg, N=2, K=1, H=8, mesh_shape=dict(context=8), kernel=kernel, softcap=2.0, window=11, traced=traced
    )


@pytest.mark.parametrize(
    "kernel, family, shared",
    # splash-qwen3 is slow (10 s): pallas_gpu-qwen3 runs the model through the same ring driver, and
    # splash's ring equals dense attention with the shared prompt and GQA above
    [
        pytest.param("splash", "qwen3", True, marks=pytest.mark.slow),
        ("splash", "gemma2", False),
        ("pallas_gpu", "qwen3", True),
    ],
)
def test_pair_logprobs_with_pallas_kernels_at_context_4_equal_one_device(kernel, family, shared):
    """The model's forward with `attention: splash` or `pallas_gpu` on fsdp 2 x context 4 (the ring with
    the kernel in every step) against the blocked kernel on one device: the same per-pair log-probs on
    packed rows whose pairs straddle the shards, qwen3 (grouped-query heads) with the shared prompt;
    gemma2 (window 3 on alternate layers, soft-capped logits) in a layer scan, the window traced
    (splash only: pallas_gpu refuses soft-capped models, whose unsplit rows it could not run)."""
    config = ModelConfig.from_hf(tiny_hf_config(family))
    scan = family == "gemma2"
    one = random_model(config, attention="blocked", attention_block=16, scan_layers=scan)
    ctx = random_model(config, attention=kernel, attention_block=128, context=4, scan_layers=scan)
    batch = make_batch(pairs_of(9), [[0, 1, 2, 3], [4, 5], [6, 7, 8], []], 256, 4, shared_prompt=shared)

    def logps(model, batch):
        return pair_logprobs(model, batch, chunk_size=16)

    want = nnx.jit(logps)(one, jax.tree.map(jnp.asarray, batch))
    mesh = make_mesh(fsdp=2, context=4)
    with jax.set_mesh(mesh):
        got = nnx.jit(logps)(ctx, batch.on_mesh(mesh))
    assert np.asarray(want["chosen_counts"]).sum() > 0
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_kernel_choice_on_a_context_mesh():
    """splash and pallas_gpu run split rows in the ring (auto picks splash on TPU, with the shared prompt
    there; blocked on a GPU); xla is refused with the reason, and splash / pallas_gpu with the
    all-gather."""
    llama = ModelConfig.from_hf(tiny_hf_config("llama"))
    assert resolve_attention("splash", llama, context=4).kernel == "splash"
    assert resolve_attention("auto", llama, context=4, backend="tpu").kernel == "splash"
    assert resolve_attention("auto", llama, context=4, backend="gpu").kernel == "blocked"
    assert resolve_attention("auto", llama, context=4, backend="tpu", how="all_gather").kernel == "blocked"
    assert shares_prompt("auto", "splash", llama, context=4)[0]
    assert not shares_prompt("auto", "splash", llama)[0]
    assert resolve_attention("pallas_gpu", llama, context=4).kernel == "pallas_gpu"
    assert shares_prompt("auto", "pallas_gpu", llama, context=4)[0]
    assert not shares_prompt("auto", "pallas_gpu", llama)[0]
    with pytest.raises(ConfigError, match="pallas_gpu cannot run this model: it cannot soft-cap"):
        resolve_attention("pallas_gpu", ModelConfig.from_hf(tiny_hf_config("gemma2")), context=4)
    with pytest.raises(ConfigError, match=r"xla cannot run .* dense \[T, T\] mask"):
        resolve_attention("xla", llama, context=2)
    for kernel in ("splash", "pallas_gpu"):
        with pytest.raises(
            ConfigError, match=f"all_gather with model.attention={kernel} .* in the ring only"
        ):
            resolve_attention(kernel, llama, context=4, how="all_gather")


# Slow (interpret-mode Splash in a jitted train step, ~1 min): the ring's values and gradients are
# test_splash_ring_equals_dense_attention_*, the model's forward test_pair_logprobs_with_splash_*.
@pytest.mark.slow
def test_training_steps_with_splash_at_context_4_equal_one_device(assets, tmp_path):
    from helpers import one_device, run_config
    from helpers import train_steps as steps
    from test_train import assert_close_metrics

    from jdpo.train import trainer as train

    base = {"data.row_length": 64, "train.max_steps": 2, "train.log_every": 1}
    one = train.Trainer(run_config(assets, tmp_path / "one", **base), mesh=one_device())
    over = {**base, "mesh.context": 4, "model.attention": "splash", "dpo.cache_dir": str(tmp_path / "c")}
    ctx = train.Trainer(run_config(assets, tmp_path / "ctx", **over))
    assert ctx.attention[0] == "splash" and one.attention[0] == "blocked"
    assert ctx.data.layout.shared_prompt and one.data.layout.shared_prompt
    for split in ("train", "eval"):
        np.testing.assert_allclose(
            ctx.reference.logps[split].chosen, one.reference.logps[split].chosen, rtol=1e-5, atol=1e-5
        )
    for a, b in zip(steps(one, 2), steps(ctx, 2), strict=True):
        assert_close_metrics(a, b)
