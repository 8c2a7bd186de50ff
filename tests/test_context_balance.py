"""Rows dealt over the context axis in blocks (`model.context_balance: blocks`,
`jdpo.data.context_balance`): the deal is a permutation of whole blocks with the same number per device,
it evens out the causal work of packed documents where the fixed chunk layout does not, and a model fed
dealt rows gives the per-pair log-probs and gradients of one device on the natural rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config
from test_context import MESHES, _loss_fn
from test_shared_prompt import pairs_of

from jdpo.data import make_batch
from jdpo.data.context_balance import BlockBalance, deal_blocks, device_work, tile_work
from jdpo.models import ModelConfig
from jdpo.parallel.context_layout import natural_order
from jdpo.parallel.sharding import make_mesh
from jdpo.report.flops import attended_keys


def test_tile_work_counts_the_key_tiles_the_blocked_kernel_visits():
    # prompt (segment -1) of 3, chosen (1) of 2, rejected (2) of 2, padding
    seg = np.array([-1, -1, -1, 1, 1, 2, 2, 0])
    # Tiles of one position: the keys each query sees (its segment so far, a branch's whole prompt).
    np.testing.assert_array_equal(tile_work(seg, 1), [1, 2, 3, 4, 5, 4, 5, 1])
    assert tile_work(seg, 1).sum() == attended_keys(seg[None]) + 1  # the padding query sees itself
    # Tiles of two: [-1 -1] itself; [-1 1] tiles 0-1; [1 2] its own from tile 1 and the prompt's tile 0;
    # [2 0] its own from tile 2 and the prompt's tiles 0-1.
    np.testing.assert_array_equal(tile_work(seg, 2), [1, 2, 3, 4])


def test_deal_is_a_permutation_of_whole_blocks_and_evens_out_unequal_documents():
    # One document of 3/4 of the row and one of 1/4: chunks i and 2C - 1 - i leave device 4..7 with 1.6x
    # the mean (the document's late chunks pair with each other), the deal evens it out to a block.
    C, G, T = 8, 16, 2048
    seg = np.concatenate([np.full(1536, 1), np.full(512, 2)]).astype(np.int32)
    fixed = device_work(seg, C, G)
    order = deal_blocks(seg, C, G)
    assert sorted(order.tolist()) == list(range(T))
    blocks = order.reshape(-1, G)
    assert (blocks == blocks[:, :1] + np.arange(G)).all() and (blocks[:, 0] % G == 0).all()
    dealt = device_work(seg[order], C, G, order)
    assert dealt.sum() == fixed.sum()
    assert fixed.max() / fixed.mean() > 1.5
    assert dealt.max() / dealt.mean() < 1.01


def test_make_batch_deals_only_rows_that_split_and_keeps_the_fields_together():
    pairs = pairs_of(9)
    rows = [[0, 1, 2, 3], [4, 5], [6, 7, 8], []]
    natural = make_batch(pairs, rows, 256, 4, shared_prompt=True)
    dealt = make_batch(pairs, rows, 256, 4, shared_prompt=True, balance=BlockBalance(4, 16))
    assert natural.slots is None and dealt.slots.shape == (4, 256)
    for name in ("input_ids", "positions", "segment_ids", "targets", "loss_mask"):
        np.testing.assert_array_equal(natural_order(dealt[name], dealt.slots), natural[name])
    assert not np.array_equal(dealt.segment_ids, natural.segment_ids)
    # Rows of a length that does not cut into 2 x context chunks run whole: not dealt.
    assert make_batch(pairs, rows, 252, 4, balance=BlockBalance(4, 16)).slots is None


SLOW = pytest.mark.slow  # covered by the qwen3 case and tests/test_context.py's chunk-layout cases


@pytest.mark.parametrize(
    "family, shared, mesh_name",
    [("qwen3", True, "data2_context4"), pytest.param("gemma2", False, "context8", marks=SLOW)],
)
def test_dealt_rows_give_one_devices_pair_logprobs_and_gradients(family, shared, mesh_name):
    config = ModelConfig.from_hf(tiny_hf_config(family))
    model = random_model(config, attention="blocked", attention_block=16, context_attention="all_gather")
    graphdef, params = nnx.split(model)
    pairs, rows = pairs_of(9), [[0, 1, 2, 3], [4, 5], [6, 7, 8], []]
    C = MESHES[mesh_name]["context"]
    natural = make_batch(pairs, rows, 256, 4, shared_prompt=shared)
    dealt = make_batch(pairs, rows, 256, 4, shared_prompt=shared, balance=BlockBalance(C, 16))
    assert dealt.slots is not None
    step = jax.value_and_grad(_loss_fn(graphdef), has_aux=True)
    (l_one, out_one), g_one = jax.jit(step)(params, jax.tree.map(jnp.asarray, natural))
    mesh = make_mesh(**MESHES[mesh_name])
    with jax.set_mesh(mesh):
        (l_ctx, out_ctx), g_ctx = jax.jit(step)(params, dealt.on_mesh(mesh))
    for key in out_one:
        np.testing.assert_allclose(out_ctx[key], out_one[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_ctx, l_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ctx), jax.tree.leaves(g_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6 * max(1.0, float(np.abs(b).max())))
