"""Context parallelism (`mesh.context`): every row's tokens split over devices in the balanced layout.
Per-pair log-probs and their gradients on `data 2 x context 4` and `context 8` equal one device's, on
packed rows whose pairs straddle the shard boundaries, with and without the shared prompt, with
grouped-query heads and a sliding-window family; the layout's chunk exchange."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config
from test_shared_prompt import pairs_of

from jdpo.data import make_batch
from jdpo.models import ModelConfig
from jdpo.models.context_attention import context_attention
from jdpo.models.masks import AttentionMask
from jdpo.parallel import context_layout
from jdpo.parallel.sharding import make_mesh
from jdpo.scoring.forward import pair_logprobs

MESHES = {"data2_context4": dict(data=2, context=4), "context8": dict(context=8)}


def _loss_fn(graphdef):
    def loss(params, batch):
        out = pair_logprobs(nnx.merge(graphdef, params), batch, chunk_size=16)
        weights = jnp.arange(1.0, 1.0 + out["chosen"].size).reshape(out["chosen"].shape)
        return jnp.sum(weights * (out["chosen"] - 0.5 * out["rejected"])), out

    return loss


def _straddles(segment_ids_BxT, shards: int) -> bool:
    """Whether some pair's sequence crosses a boundary between the natural order's contiguous shards."""
    T = segment_ids_BxT.shape[1]
    cut = np.arange(1, shards) * (T // shards)
    left, right = segment_ids_BxT[:, cut - 1], segment_ids_BxT[:, cut]
    return bool(((left == right) & (left != 0)).any())


# (family, shared prompt, mesh, how k / v reach the queries): each mesh runs GQA with and without the
# shared prompt and the sliding-window, soft-capped family (gemma2: window 3, so local layers see across
# a shard's start), the all-gather and the ring.
SLOW = pytest.mark.slow  # covered fast by the dense-attention check below and the qwen3 ring case
CASES = [
    ("qwen3", True, "data2_context4", "ring"),
    pytest.param("llama", False, "data2_context4", "all_gather", marks=SLOW),
    pytest.param("llama", True, "context8", "all_gather", marks=SLOW),
    pytest.param("gemma2", False, "context8", "ring", marks=SLOW),
    pytest.param("gemma2", False, "data2_context4", "all_gather", marks=SLOW),
    pytest.param("llama", False, "context8", "ring", marks=SLOW),
]


@pytest.mark.parametrize("family, shared, mesh_name, how", CASES)
def test_pair_logprobs_and_gradients_equal_one_device(family, shared, mesh_name, how):
    config = ModelConfig.from_hf(tiny_hf_config(family))
    model = random_model(config, attention="blocked", attention_block=16, context_attention=how)
    graphdef, params = nnx.split(model)
    pairs = pairs_of(9)
    rows = [[0, 1, 2, 3], [4, 5], [6, 7, 8], []]
    batch = make_batch(pairs, rows, 256, 4, shared_prompt=shared)
    assert _straddles(batch.segment_ids, 8) and _straddles(batch.segment_ids, 4)
    step = jax.value_and_grad(_loss_fn(graphdef), has_aux=True)
    (l_one, out_one), g_one = jax.jit(step)(params, jax.tree.map(jnp.asarray, batch))
    mesh = make_mesh(**MESHES[mesh_name])
    with jax.set_mesh(mesh):
        (l_ctx, out_ctx), g_ctx = jax.jit(step)(params, batch.on_mesh(mesh))
    assert np.asarray(out_one["chosen_counts"]).sum() > 0
    for key in out_one:
        np.testing.assert_allclose(out_ctx[key], out_one[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_ctx, l_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ctx), jax.tree.leaves(g_one), strict=True):
        # float32 sums in another order: tolerance relative to the gradient's scale (up to ~50 here)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6 * max(1.0, float(np.abs(b).max())))


def test_balanced_layout_holds_chunks_i_and_2c_minus_1_minus_i_and_moves_back():
    C, T = 4, 32
    mesh = make_mesh(context=C)
    x = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    with jax.set_mesh(mesh):
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context")))
        balanced = jax.jit(context_layout.to_balanced)(x)
        back = jax.jit(context_layout.from_balanced)(balanced)
    chunk = T // (2 * C)
    order = context_layout.balanced_order(C)
    assert order == [0, 7, 1, 6, 2, 5, 3, 4]
    expected = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order])
    np.testing.assert_array_equal(np.asarray(balanced)[0], expected)
    for shard in balanced.addressable_shards:  # device i: chunks i and 2C - 1 - i
        i = shard.index[1].start // (T // C)
        np.testing.assert_array_equal(
            np.asarray(shard.data)[0], expected[i * 2 * chunk : (i + 1) * 2 * chunk]
        )
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


@pytest.mark.parametrize(
    "how, mesh_shape", [("ring", dict(context=8)), ("all_gather", dict(fsdp=2, context=4))]
)
def test_context_attention_and_its_backward_equal_dense_attention(how, mesh_shape):
    """The ring's backward (and the all-gather's) against dense masked attention: values and the
    gradients of q, k, v, on packed rows with a shared prefix, over context 8 and fsdp 2 x context 4."""
    B, T, N, K, H = 2, 64, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = np.zeros((B, T), np.int32)
    seg[0, :10], seg[0, 10:30], seg[0, 30:50], seg[0, 50:60] = -1, 1, 2, 3
    seg[1, :40], seg[1, 40:] = 1, 2
    mask = AttentionMask(jnp.asarray(seg))
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) * (jnp.asarray(seg) != 0)[..., None, None]

    def dense(q, k, v):
        kk, vv = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
        out = jax.nn.dot_product_attention(q, kk, vv, mask=mask.dense(), scale=0.3, implementation="xla")
        return jnp.sum(out * w)

    def split(q, k, v):  # the kernel takes the balanced layout (device i: chunks i and 2C - 1 - i)
        q, k, v, ids = (context_layout.to_balanced(x) for x in (q, k, v, mask.segment_ids_BxT))
        out = context_attention(q, k, v, AttentionMask(ids), scale=0.3, block=4, how=how)
        return jnp.sum(context_layout.from_balanced(out) * w)

    want, want_g = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, k, v)
    mesh = make_mesh(**mesh_shape)
    with jax.set_mesh(mesh):
        got, got_g = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_rows_that_do_not_split_run_whole_on_a_context_mesh():
    """Sequences of a length that does not cut into 2 x context chunks (sampled text, `jdpo eval`'s
    fitted rows) run unsplit on every device of the context group: the same logits as one device."""
    config = ModelConfig.from_hf(tiny_hf_config("llama"))
    graphdef, params = nnx.split(random_model(config, attention="blocked", attention_block=16))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 60)), jnp.int32)  # 60 % 8 != 0

    def logits(params, ids):
        return nnx.merge(graphdef, params)(ids)

    want = jax.jit(logits)(params, ids)
    mesh = make_mesh(fsdp=2, context=4)
    with jax.set_mesh(mesh):
        assert context_layout.splits(60) == 1 and context_layout.splits(64) == 4
        got = jax.jit(logits)(params, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
