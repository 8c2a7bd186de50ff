"""The accelerator kernels, TPU Splash attention (`jdpo.models.splash`) and the Pallas GPU flash attention
(`jdpo.models.pallas_gpu`), run here in Pallas' interpret mode on the CPU: against dense masked
attention written out and the blocked kernel, values and gradients, on packed rows with padding;
grouped-query heads, soft-capping and sliding windows (static and traced) for splash; under a mesh
(shard_map over rows and heads); in the whole model against attention="xla"; and `auto`'s choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_hf_config
from helpers_attention import dense_reference, packed_segments, qkv, segment_positions

from jdpo.config import ConfigError
from jdpo.models import AttentionMask, ModelConfig, ModelOptions, Transformer
from jdpo.models.attention import blocked_attention
from jdpo.models.kernels import resolve_attention
from jdpo.models.pallas_gpu import pallas_gpu_attention
from jdpo.models.splash import splash_attention, tile_for


def check_against_dense(kernel, q, k, v, seg, *, atol=2e-5, gtol=5e-5, **ref_kw):
    """`kernel(q, k, v)` equals dense attention on every real position, and so do the gradients of a
    loss over real positions (padding outputs are finite junk in every path)."""
    real = (np.asarray(seg) > 0)[:, :, None, None]
    w = jax.random.normal(jax.random.key(9), q.shape) * real

    def dense(q, k, v):
        return dense_reference(q, k, v, seg, **ref_kw)

    got, want = jax.jit(kernel)(q, k, v), dense(q, k, v)
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=atol)
    g_got = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    g_want = jax.grad(lambda *a: jnp.sum(dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want, strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(a, b, atol=gtol)
    return got


# T of 2-3 tiles of 128 (splash's smallest tile) so that tiles are skipped, partial and full.
SPLASH_CASES = {
    "gqa_ragged_T": dict(B=2, T=300, N=4, K=2, H=16),
    "softcap_mqa": dict(B=1, T=256, N=4, K=1, H=16, softcap=5.0),
    "window": dict(B=2, T=256, N=2, K=2, H=8, window=37),
}


# softcap_mqa and window are slow (15 s, 14 s): the soft cap through splash is covered by the model-level
# splash test, the window by the context ring's window test against dense (tests/test_context_kernels.py).
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n != "gqa_ragged_T" else n for n in SPLASH_CASES]
)
def test_splash_equals_dense_and_blocked_in_values_and_grads(name):
    c = dict(SPLASH_CASES[name])
    B, T, N, K, H = (c.pop(x) for x in ("B", "T", "N", "K", "H"))
    softcap, window = c.pop("softcap", None), c.pop("window", None)
    q, k, v = qkv(B, T, N, K, H, seed=1)
    seg = jnp.asarray(packed_segments(np.random.default_rng(2), B, T))
    kw = dict(scale=H**-0.5, softcap=softcap)
    mask = AttentionMask(seg, window=window)
    got = check_against_dense(
        lambda q, k, v: splash_attention(q, k, v, mask, block=128, **kw), q, k, v, seg, window=window, **kw
    )
    real = (np.asarray(seg) > 0)[:, :, None, None]
    blocked = blocked_attention(q, k, v, mask, block=16, **kw)
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(blocked) * real, atol=2e-5)


def test_splash_traced_window_picks_the_layer_kind():
    """Under a layer scan the window is traced: the static window on sliding layers, S + 1 on full ones
    (`AttentionMask.for_layer`); splash builds both masks and picks per layer."""
    B, T, N, K, H, window = 1, 256, 2, 1, 8, 20
    q, k, v = qkv(B, T, N, K, H, seed=3)
    seg = jnp.asarray(packed_segments(np.random.default_rng(4), B, T))
    mask = AttentionMask(seg, window=window)

    @jax.jit
    def both(q, k, v):
        def layer(_, is_sliding):
            out = splash_attention(
                q, k, v, mask.for_layer(is_sliding), scale=0.3, block=128, sliding_window=window
            )
            return None, out

        return jax.lax.scan(layer, None, jnp.asarray([True, False]))[1]

    sliding, full = both(q, k, v)
    real = (np.asarray(seg) > 0)[:, :, None, None]
    for got, w in ((sliding, window), (full, None)):
        want = dense_reference(q, k, v, seg, scale=0.3, window=w)
        np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=2e-5)
    with pytest.raises(ValueError, match="needs the static sliding_window"):
        jax.jit(lambda w: splash_attention(q, k, v, AttentionMask(seg, window=w), scale=0.3))(jnp.int32(5))


def test_splash_bf16_inputs_match_float32_closely():
    B, T, N, K, H = 1, 128, 4, 2, 16
    q, k, v = qkv(B, T, N, K, H, seed=5)
    seg = jnp.asarray(packed_segments(np.random.default_rng(2), B, T))
    mask, real = AttentionMask(seg), (np.asarray(seg) > 0)[:, :, None, None]
    ref = splash_attention(q, k, v, mask, scale=0.25, block=128)
    low = splash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, scale=0.25, block=128)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32) * real, np.asarray(ref) * real, atol=5e-2)


def test_splash_tiles():
    """Tiles are multiples of 128 (the kernel refuses others), at most the row rounded up to 128."""
    assert tile_for(4096, 512) == 512 and tile_for(300, 512) == 384 and tile_for(40, 64) == 128
    assert tile_for(4096, 200) == 128


PALLAS_GPU_CASES = {
    "gqa_ragged_T": dict(B=2, T=100, N=4, K=2, H=16, block=32),
    "mha": dict(B=1, T=128, N=2, K=2, H=8, block=64),
}


@pytest.mark.parametrize("name", list(PALLAS_GPU_CASES))
def test_pallas_gpu_equals_dense_in_values_and_grads(name):
    c = PALLAS_GPU_CASES[name]
    q, k, v = qkv(c["B"], c["T"], c["N"], c["K"], c["H"], seed=5)
    seg = jnp.asarray(packed_segments(np.random.default_rng(6), c["B"], c["T"]))
    scale = c["H"] ** -0.5
    mask = AttentionMask(seg)
    check_against_dense(
        lambda q, k, v: pallas_gpu_attention(q, k, v, mask, scale=scale, block=c["block"]),
        q,
        k,
        v,
        seg,
        scale=scale,
    )


def test_pallas_gpu_window_only_when_it_restricts_nothing():
    """The kernel has no sliding window: one that reaches past the row (>= T) is no restriction and runs;
    a shorter one is refused with the kernel named, never silently ignored."""
    q, k, v = qkv(1, 64, 2, 2, 8)
    seg = jnp.asarray(packed_segments(np.random.default_rng(7), 1, 64))
    full = pallas_gpu_attention(q, k, v, AttentionMask(seg), scale=0.3, block=32)
    wide = pallas_gpu_attention(q, k, v, AttentionMask(seg, window=64), scale=0.3, block=32)
    np.testing.assert_array_equal(full, wide)
    with pytest.raises(ValueError, match="pallas_gpu_attention has no sliding window"):
        pallas_gpu_attention(q, k, v, AttentionMask(seg, window=8), scale=0.3, block=32)
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu_attention(q, k, v, AttentionMask(seg), scale=0.3, block=48)


@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
def test_kernels_under_a_mesh_match_one_device(kernel):
    """shard_map over rows (data x fsdp) and heads (tensor): each device runs the kernel on its own rows
    and heads, and the result equals the single-device one."""
    from jdpo.parallel.sharding import make_mesh

    B, T, N, K, H = 4, 128, 4, 2, 8
    q, k, v = qkv(B, T, N, K, H, seed=8)
    seg = jnp.asarray(packed_segments(np.random.default_rng(9), B, T))
    if kernel == "splash":
        fn = lambda q, k, v: splash_attention(q, k, v, AttentionMask(seg), scale=0.3, block=128)  # noqa: E731
    else:
        fn = lambda q, k, v: pallas_gpu_attention(q, k, v, AttentionMask(seg), scale=0.3, block=32)  # noqa: E731
    one = jax.jit(fn)(q, k, v)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        sharded = jax.jit(fn)(q, k, v)
    np.testing.assert_allclose(sharded, one, atol=1e-6)


SIZES = dict(vocab_size=64, intermediate_size=48)
HF_CONFIGS = {
    "llama": tiny_hf_config("llama", **SIZES),
    # gemma2: the attention soft-cap and a window of 5 on alternate layers (traced under the scan).
    "gemma2": tiny_hf_config(
        "gemma2", sliding_window=5, final_logit_softcapping=None, hidden_activation="silu", **SIZES
    ),
}


@pytest.mark.parametrize(
    "family,kernel,scan_layers",
    [
        ("llama", "splash", False),
        # Slow (20 s); in the default run test_splash_traced_window_picks_the_layer_kind pins the traced
        # window under a scan and test_splash_equals_dense_and_blocked_in_values_and_grads the soft-cap.
        pytest.param("gemma2", "splash", True, marks=pytest.mark.slow),
        ("llama", "pallas_gpu", True),
    ],
)
def test_model_with_pallas_kernels_equals_xla_attention(family, kernel, scan_layers):
    """The whole model with each kernel and with attention="xla" (dense masks): same logits on real
    positions and same parameter gradients on a packed batch with padding."""
    config = ModelConfig.from_hf(HF_CONFIGS[family])
    B, T = 2, 40
    seg = packed_segments(np.random.default_rng(3), B, T)
    pos = jnp.asarray(segment_positions(seg))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (B, T)), jnp.int32)
    seg = jnp.asarray(seg)
    real = np.asarray(seg) > 0

    def loss(m):
        logits = m(ids, pos, seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits

    out = {}
    for attention in (kernel, "xla"):
        model = Transformer(
            config, options=ModelOptions(scan_layers=scan_layers, attention=attention), rngs=nnx.Rngs(0)
        )
        assert model.options.attention == attention
        out[attention] = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    (l_k, logits_k), g_k = out[kernel]
    (l_x, logits_x), g_x = out["xla"]
    np.testing.assert_allclose(np.asarray(logits_k)[real], np.asarray(logits_x)[real], atol=2e-5)
    np.testing.assert_allclose(l_k, l_x, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_auto_resolves_per_backend_and_model():
    """auto: splash on TPU, pallas_gpu on NVIDIA GPUs unless the model soft-caps or slides (blocked
    then), blocked on CPU; a named kernel the model cannot run is refused before any weight loads."""
    llama, gemma2 = (ModelConfig.from_hf(HF_CONFIGS[f]) for f in ("llama", "gemma2"))
    mistral = ModelConfig.from_hf(tiny_hf_config("llama", model_type="mistral", sliding_window=16, **SIZES))
    assert resolve_attention("auto", llama, backend="tpu").kernel == "splash"
    assert resolve_attention("auto", gemma2, backend="tpu").kernel == "splash"
    assert resolve_attention("auto", llama, backend="gpu").kernel == "pallas_gpu"
    for cfg in (gemma2, mistral):
        choice = resolve_attention("auto", cfg, backend="gpu")
        assert choice.kernel == "blocked" and "not pallas_gpu" in choice.reason
    assert resolve_attention("auto", llama, backend="cpu") == ("blocked", "model.attention=auto on cpu")
    assert resolve_attention("xla", gemma2, backend="tpu").kernel == "xla"
    with pytest.raises(
        ConfigError, match="model.attention=pallas_gpu cannot run this model: it cannot soft-cap"
    ):
        nnx.eval_shape(
            lambda: Transformer(gemma2, options=ModelOptions(attention="pallas_gpu"), rngs=nnx.Rngs(0))
        )
    # A tile the resolved kernel cannot take is refused when the model is built, naming the field.
    bad = ModelOptions(attention="pallas_gpu", attention_block=96)
    with pytest.raises(
        ConfigError, match="model.attention_block=96 with pallas_gpu: Triton tiles are powers"
    ):
        nnx.eval_shape(lambda: Transformer(llama, options=bad, rngs=nnx.Rngs(0)))
    # Here (CPU) the default is the blocked kernel with its own tile.
    model = nnx.eval_shape(lambda: Transformer(llama, rngs=nnx.Rngs(0)))
    assert (model.options.attention, model.options.attention_block) == ("blocked", 64)
    assert model.attention_reason == "model.attention=auto on cpu"
