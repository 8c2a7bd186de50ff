"""jdpo.train.checkpoint: sharded round trip, JSON meta, keep-last-N, restore of the newest by default."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jdpo.train.checkpoint import Checkpointer, abstract_like


def _state(mesh, scale):
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4) * scale, NamedSharding(mesh, PartitionSpec("fsdp")))
    return {
        "params": {"w": w, "b": jnp.full((3,), scale, jnp.bfloat16)},
        "step": jnp.asarray(int(scale), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(scale))),
    }


def test_roundtrip_keep_and_latest(tmp_path):
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    with Checkpointer(tmp_path / "ckpt", keep=2) as ck:
        assert ck.latest_step() is None
        for step in (1, 2, 3):
            ck.save(step, _state(mesh, step), {"data": {"epoch": 0, "index": step, "order": "abc"}})
        ck.save(3, _state(mesh, 99), {"ignored": True})  # an existing step is left alone
        ck.wait()
        assert ck.steps() == [2, 3]
    # A fresh Checkpointer (a resumed process) finds the newest checkpoint and restores its shardings.
    with Checkpointer(tmp_path / "ckpt", keep=2) as ck:
        assert ck.latest_step() == 3
        target = abstract_like(_state(mesh, 0))
        state, meta = ck.restore(target)
        want = _state(mesh, 3)
        assert meta == {"data": {"epoch": 0, "index": 3, "order": "abc"}}
        for got, exp in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
            assert got.dtype == exp.dtype and got.sharding == exp.sharding
            np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
        old, _ = ck.restore(target, step=2)
        np.testing.assert_array_equal(
            np.asarray(old["params"]["w"]), np.asarray(_state(mesh, 2)["params"]["w"])
        )


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    """`train.output_dir: runs/x` is relative to where the command runs; orbax itself refuses relative
    paths, so the Checkpointer anchors them (this failed the README's `jdpo demo` before)."""
    monkeypatch.chdir(tmp_path)
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    with Checkpointer("runs/rel/checkpoints", keep=1) as ck:
        ck.save(1, _state(mesh, 1), {"data": {}})
        ck.wait()
    assert (tmp_path / "runs" / "rel" / "checkpoints").is_dir()
    with Checkpointer("runs/rel/checkpoints", keep=1) as ck:
        assert ck.latest_step() == 1
        state, _ = ck.restore(abstract_like(_state(mesh, 0)))
        np.testing.assert_array_equal(
            np.asarray(state["params"]["w"]), np.asarray(_state(mesh, 1)["params"]["w"])
        )


def test_restore_intact_skips_a_checkpoint_whose_arrays_changed(tmp_path, monkeypatch):
    """The fingerprint saved with the state is compared on restore: a checkpoint whose arrays no longer
    hash to it is moved aside (not deleted) and the previous one is restored."""
    from jdpo.train import checkpoint

    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    with Checkpointer(tmp_path / "ckpt", keep=3) as ck:
        for step in (1, 2):
            ck.save(step, _state(mesh, step), {"step": step})
        ck.wait()
    real = checkpoint.weights_fingerprint
    # As if step 2's bytes had changed on disk after it was written: its arrays hash to something else.
    monkeypatch.setattr(
        checkpoint, "weights_fingerprint", lambda t: "changed" if float(t["step"]) == 2 else real(t)
    )
    with Checkpointer(tmp_path / "ckpt", keep=3) as ck:
        state, meta, skipped = ck.restore_intact(abstract_like(_state(mesh, 0)))
        assert meta == {"step": 1} and int(state["step"]) == 1
        assert [s for s, _ in skipped] == [2] and "fingerprint" in skipped[0][1]
        assert ck.steps() == [1]
    assert (tmp_path / "ckpt.damaged" / "2").is_dir()
