"""Mesh creation, the logical-axis rules, and sharded models on 8 CPU devices matching one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config  # numpy-filled weights: no RNG compiles
from jax.sharding import PartitionSpec as P

from jdpo.models import ModelConfig, ModelOptions, from_pretrained, init_model, save_pretrained
from jdpo.parallel.sharding import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    constrain,
    logical_to_spec,
    make_mesh,
    named_sharding,
)


def test_make_mesh_axes_and_remaining_devices():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert", "context") and dict(mesh.shape) == dict(
        data=2, fsdp=2, tensor=2, expert=1, context=1
    )
    assert dict(make_mesh(fsdp=-1).shape) == dict(data=1, fsdp=8, tensor=1, expert=1, context=1)
    assert dict(make_mesh(data=2, fsdp=-1).shape) == dict(data=2, fsdp=4, tensor=1, expert=1, context=1)
    assert dict(make_mesh(data=2, expert=4).shape) == dict(data=2, fsdp=1, tensor=1, expert=4, context=1)
    assert dict(make_mesh(fsdp=-1, context=4).shape) == dict(data=1, fsdp=2, tensor=1, expert=1, context=4)
    assert make_mesh().size == 1
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(data=4, fsdp=4)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_rules_and_fallbacks():
    assert logical_to_spec(("embed", "mlp")) == P(("fsdp", "context"), "tensor")
    # parameters split over the devices of a row (context) as over fsdp
    assert logical_to_spec(("embed", "mlp"), (64, 8), make_mesh(fsdp=2, context=4)) == P(
        ("fsdp", "context"), None
    )
    assert logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp", "expert"), "context", None)
    # MoE experts over the expert axis, which also splits the rows
    ep = make_mesh(data=2, expert=4)
    assert logical_to_spec(("expert", "embed", "mlp"), (4, 32, 16), ep) == P("expert", None, None)
    assert logical_to_spec(("batch", None), (8, 4), ep) == P(("data", "expert"), None)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # the token axis of activations splits over context only where the mesh has one
    assert logical_to_spec(("batch", "length"), (8, 64), mesh) == P(("data", "fsdp"), None)
    # a dimension that does not divide by its mesh axes is replicated, not an error
    assert logical_to_spec(("vocab", "embed"), (127, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    # mesh axes of size 1 are dropped
    assert logical_to_spec(("batch", "act_vocab"), (8, 128), make_mesh(fsdp=8)) == P("fsdp", None)
    # a mesh axis is used once per spec
    assert logical_to_spec(("embed", "embed")) == P(("fsdp", "context"), None)
    with pytest.raises(KeyError, match="no_such_axis"):
        logical_to_spec(("no_such_axis",))
    assert set(LOGICAL_AXIS_RULES) >= {
        "embed",
        "vocab",
        "heads",
        "kv_heads",
        "head_dim",
        "mlp",
        "batch",
        "length",
    }
    assert (
        named_sharding(mesh, ("batch", None), (8, 4)).spec
        == batch_sharding(mesh).spec
        == P(("data", "fsdp"), None)
    )


def test_constrain_is_a_noop_without_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "length", "act_embed")) is x
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "length", "act_mlp")))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")


# Heads (4 / 2 kv), vocab (128) and mlp (64) divide by tensor=2; embed (32) by fsdp=8. gemma2 with SiLU
# (as these tests always had it; the activation does not matter to sharding).
HF_CONFIGS = {"llama": tiny_hf_config("llama"), "gemma2": tiny_hf_config("gemma2", hidden_activation="silu")}
MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """A saved random model plus its single-device logits and gradients on a padded, packed batch."""
    config = ModelConfig.from_hf(HF_CONFIGS[request.param])
    path = tmp_path_factory.mktemp(f"shard_{request.param}")
    save_pretrained(random_model(config), path)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 128, (8, 12)).astype(np.int32)
    seg = np.ones((8, 12), np.int32)
    seg[1, 7:] = 0  # padding
    seg[2, 5:] = 2  # a second packed segment
    pos = np.where(seg[:, :, None] == seg[:, None, :], np.tril(np.ones((12, 12), np.int32)), 0).sum(-1) - 1
    batch = dict(ids=ids, pos=pos.astype(np.int32), seg=seg)
    model, _ = from_pretrained(path)
    logits, grads = _logits_and_grads(model, batch)
    return dict(path=path, batch=batch, logits=np.asarray(logits), grads=_grads_by_name(grads))


def _loss(model, ids, pos, seg):
    logits = model(ids, pos, seg)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * (seg > 0)), logits


@nnx.jit
def _logits_and_grads(model, batch):
    (_, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(
        model, batch["ids"], batch["pos"], batch["seg"]
    )
    return logits, grads


def _grads_by_name(grads):
    """Gradients keyed by HF-style per-layer names so loop and scan layouts compare."""
    out = {}
    for path, g in nnx.to_flat_state(grads):
        name = ".".join(str(p) for p in path)
        g = np.asarray(g)
        if name.startswith("layers.") and not name.split(".")[1].isdigit():  # stacked [L, ...]
            for i in range(g.shape[0]):
                out[name.replace("layers.", f"layers.{i}.", 1)] = g[i]
        else:
            out[name] = g
    return out


# (config, mesh, layout): each config and each layout runs on both meshes, in 4 compiles rather than 8.
COMBOS = [
    ("llama", "fsdp8", False),
    ("llama", "data2_fsdp2_tensor2", True),
    ("gemma2", "fsdp8", True),
    ("gemma2", "data2_fsdp2_tensor2", False),
]


@pytest.mark.parametrize("reference, mesh_name, scan_layers", COMBOS, indirect=["reference"])
def test_sharded_model_matches_one_device(reference, mesh_name, scan_layers):
    mesh = make_mesh(*MESHES[mesh_name])
    model, config = from_pretrained(
        reference["path"], options=ModelOptions(scan_layers=scan_layers), mesh=mesh
    )
    q_kernel = (
        model.layers.self_attn if scan_layers else model.layers[0].self_attn
    ).q_proj.kernel.get_value()
    expected = logical_to_spec(
        ("layers",) * scan_layers + ("embed", "heads", "head_dim"), q_kernel.shape, mesh
    )
    assert q_kernel.sharding.spec == expected and "fsdp" in str(expected)
    with jax.set_mesh(mesh):
        batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in reference["batch"].items()}
        logits, grads = _logits_and_grads(model, batch)
    assert logits.sharding.spec[0] == logical_to_spec(("batch",), (8,), mesh)[0]  # rows stay sharded
    np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-5)
    grads = _grads_by_name(grads)
    assert grads.keys() == reference["grads"].keys()
    for name, g in grads.items():
        np.testing.assert_allclose(g, reference["grads"][name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_init_model_is_born_sharded_and_sharding_invariant():
    config = ModelConfig.from_hf(HF_CONFIGS["llama"])
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    scanned = ModelOptions(scan_layers=True)
    sharded = init_model(config, options=scanned, seed=3, mesh=mesh)
    up = sharded.layers.mlp.up_proj.kernel.get_value()
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    assert sharded.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    single = init_model(config, options=scanned, seed=3)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(up).std() > 0.01  # really random


@pytest.mark.parametrize("reference", ["llama"], indirect=True)
def test_loading_reads_only_each_devices_slice(reference, monkeypatch):
    """Lazy import: on fsdp=8 every device reads 1/8 of a kernel from the file, never the whole tensor."""
    import jdpo.models.hf as hf

    reads = []

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key):
            tensor = self.handle.get_slice(key)

            class Slice:
                def get_shape(self):
                    return tensor.get_shape()

                def __getitem__(self, index):
                    block = tensor[index]
                    reads.append((key, tuple(tensor.get_shape()), block.shape))
                    return block

            return Slice()

    real_open = hf.safe_open

    class RecordingOpen:
        def __init__(self, *args, **kwargs):
            self.ctx = real_open(*args, **kwargs)

        def __enter__(self):
            return Recording(self.ctx.__enter__())

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    monkeypatch.setattr(hf, "safe_open", RecordingOpen)
    from_pretrained(reference["path"], mesh=make_mesh(fsdp=8))
    up = [(full, got) for key, full, got in reads if key == "model.layers.0.mlp.up_proj.weight"]
    assert up and all(got == (full[0], full[1] // 8) for full, got in up)  # [F, D/8]: D is fsdp-sharded
    assert all(np.prod(got) < np.prod(full) for _, full, got in reads if len(full) == 2)
