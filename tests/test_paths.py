"""Output directories as URLs (`jdpo.paths`): a `file://` run, and a run on an object store.

No test here reaches a real bucket. The object store is fsspec's in-memory filesystem registered as
fsspec's `gs` protocol, so a `gs://bucket/...` path takes exactly the route it takes on a TPU pod with
gcsfs (etils.epath -> its fsspec backend -> the filesystem), and the fake keeps the two limits that
matter: no append and no rename. (epath itself has no `memory://` backend, which is why the store is
mounted under `gs://` rather than used as `memory://`.) Checkpoints are the one part that cannot go
there: orbax writes arrays through tensorstore's own GCS client, which no fsspec store can serve, so
that run keeps its checkpoints in a local directory.

The training runs reuse the tiny model and task of tests/test_train.py (hidden 32, 2 layers, 3 steps).
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest
from helpers import logged_records

from jdpo import config as jconfig
from jdpo import demo, paths
from jdpo.parallel.sharding import make_mesh
from jdpo.report import metrics
from jdpo.scoring.forward import PairLogps
from jdpo.train import export as exports
from jdpo.train import refcache
from jdpo.train import trainer as train
from jdpo.train.resume import RunCheckpoints

OVER = {"train.max_steps": 3, "train.save_every": 2, "train.eval_every": 2}


# ------------------------------------------------------------------------------------------------
# The fake object store
# ------------------------------------------------------------------------------------------------


def _memory_gcs():
    from fsspec.implementations.memory import MemoryFileSystem

    class MemoryGCS(MemoryFileSystem):
        """fsspec's in-memory filesystem under the names gcsfs registers (gs, gcs), with GCS's paths
        ('bucket/key', no leading slash) and its limits: objects cannot be appended to or renamed, and
        directories are only key prefixes."""

        protocol = ("gs", "gcs")
        root_marker = ""
        store: dict = {}
        pseudo_dirs: list = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return path.strip("/")

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode or "+" in mode:
                raise NotImplementedError(f"an object store cannot append to {path}")
            return super()._open(path, mode, **kwargs)

        def mkdir(self, path, create_parents=True, **kwargs):
            pass  # GCS has no directories

        def makedirs(self, path, exist_ok=False):
            pass

        def mv(self, *args, **kwargs):
            raise AssertionError("jdpo renamed on an object store, where a rename is a visible copy")

    return MemoryGCS


@pytest.fixture
def bucket(monkeypatch):
    """gs:// backed by memory for the test; yields the store ({'bucket/key': file})."""
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("with TensorFlow installed epath sends gs:// to tf.io.gfile, not fsspec")
    from etils.epath import backend
    from fsspec.registry import _registry

    fs = _memory_gcs()
    for name in fs.protocol:
        monkeypatch.setitem(_registry, name, fs)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per protocol
    yield fs.store
    fs.store.clear()
    backend.fsspec_backend._get_filesystem.cache_clear()


# ------------------------------------------------------------------------------------------------
# as_path
# ------------------------------------------------------------------------------------------------


def test_as_path_local_file_url_and_object_store(tmp_path):
    from pathlib import Path

    local = paths.as_path(str(tmp_path / "run"))
    assert local == tmp_path / "run" and paths.is_local(local)
    assert paths.as_path((tmp_path / "a b").as_uri()) == tmp_path / "a b"  # file:// is its local path
    assert paths.as_path("runs/x") == Path("runs/x")  # relative stays relative
    gs = paths.as_path("gs://bucket/run")
    assert str(gs / "checkpoints" / "3") == "gs://bucket/run/checkpoints/3" and not paths.is_local(gs)
    assert (gs / "checkpoints").parent == gs and gs.name == "run"
    with pytest.raises(ValueError, match=r"not memory://"):  # epath has no backend for it
        paths.as_path("memory://run")
    with pytest.raises(ValueError, match="file:///abs/path"):
        paths.as_path("file://otherhost/run")
    paths.check_checkpoint_dir("gs://bucket/run")
    paths.check_checkpoint_dir(tmp_path)
    with pytest.raises(ValueError, match=r"orbax.*not s3://"):
        paths.check_checkpoint_dir("s3://bucket/run")


# ------------------------------------------------------------------------------------------------
# Writers on the object store
# ------------------------------------------------------------------------------------------------


def test_metrics_on_an_object_store_upload_whole_at_sync_points(bucket):
    out = "gs://bucket/run"
    lg = metrics.JsonlWriter(out, sync_seconds=1e9)
    assert metrics.read_metrics(out) == []  # created at once, as a local run's file is
    lg.write(1, {"loss": 0.5})
    assert metrics.read_metrics(out) == []  # not uploaded yet: an object store cannot append
    lg.flush()
    assert metrics.read_metrics(out) == [{"step": 1, "loss": 0.5}]
    for s in (2, 3):
        lg.write(s, {"loss": 0.5 / s})
    lg.close()
    assert [r["step"] for r in metrics.read_metrics(out + "/metrics.jsonl")] == [1, 2, 3]
    # Resuming from the checkpoint at step 2 drops step 3 from the uploaded file at once.
    metrics.JsonlWriter(out, resume_step=2).close()
    assert [r["step"] for r in metrics.read_metrics(out)] == [1, 2]


def test_tensorboard_events_on_an_object_store(bucket, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for steps, resume in ((range(1, 6), None), (range(4, 7), 3)):
        with metrics.MetricsLogger(
            "gs://bucket/run", console=False, jsonl=False, resume_step=resume, is_main=True
        ) as lg:
            for s in steps:
                lg.log(s, {"loss": 10.0 * s if resume else 1.0 / s})
    files = sorted(paths.as_path("gs://bucket/run/tensorboard").iterdir())
    assert len(files) == 2
    local = tmp_path / "tensorboard"
    local.mkdir()
    for f in files:
        paths.copy_file(f, local / f.name)
    ea = EventAccumulator(str(local))
    ea.Reload()
    assert [(e.step, round(e.value, 4)) for e in ea.Scalars("loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.3333), (4, 40.0), (5, 50.0), (6, 60.0)
    ]  # fmt: skip


def test_reference_cache_entry_on_an_object_store(bucket):
    import numpy as np

    ref = PairLogps(
        chosen=np.asarray([-1.0, -2.0], np.float32),
        rejected=np.asarray([-3.0, -4.0], np.float32),
        chosen_counts=np.asarray([1, 2], np.int32),
        rejected_counts=np.asarray([3, 4], np.int32),
        computed=np.asarray([True, True]),
    )
    calls = []

    def compute():
        calls.append(1)
        return ref

    # An entry whose manifest (the commit marker) is missing is not complete: it is computed again.
    paths.as_path("gs://bucket/cache/k/arrays.npz").write_bytes(b"torn")
    got, reused = refcache.load_or_compute("gs://bucket/cache", "k", 2, compute)
    assert not reused and calls == [1]
    assert json.loads(paths.as_path("gs://bucket/cache/k/manifest.json").read_text())["num_pairs"] == 2
    got, reused = refcache.load_or_compute("gs://bucket/cache", "k", 2, compute)
    assert reused and calls == [1]
    for name in ("chosen", "rejected", "chosen_counts", "rejected_counts"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


def test_config_and_plots_on_an_object_store(bucket):
    cfg = jconfig.replace(jconfig.Config(), **{"dpo.beta": 0.25, "train.output_dir": "gs://bucket/run"})
    jconfig.dump(cfg, "gs://bucket/run/config.yaml")
    assert jconfig.load_config("gs://bucket/run/config.yaml") == cfg
    pytest.importorskip("matplotlib")
    from jdpo.report.plot import plot_run

    with metrics.MetricsLogger("gs://bucket/run", console=False, tensorboard=False, is_main=True) as lg:
        for s in range(1, 6):
            lg.log(s, {"loss": 1.0 / s})
    written = plot_run("gs://bucket/run")
    assert {str(p) for p in written} == {
        "gs://bucket/run/plots/loss.png",
        "gs://bucket/run/plots/summary.png",
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_staged_dir_uploads_and_prunes_stale_shards(bucket):
    dst = paths.as_path("gs://bucket/run/final")
    with paths.staged_dir(dst) as local:
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "x.json"):
            with open(os.path.join(local, name), "w") as f:
                f.write(name)
    with paths.staged_dir(dst, prune=exports.is_weight_file) as local:
        with open(os.path.join(local, "model.safetensors"), "w") as f:
            f.write("one shard")
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors", "x.json"]
    with pytest.raises(RuntimeError), paths.staged_dir("gs://bucket/failed") as local:
        open(os.path.join(local, "half"), "w").close()
        raise RuntimeError  # a failed write uploads nothing
    assert not any(k.startswith("bucket/failed") for k in bucket)


# ------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths_assets")
    return demo.build_assets(
        d, max_operand=19, eval_pairs=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, vocab_size=128,
    )  # fmt: skip


def one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def make_config(assets, out: str, cache: str, **overrides):
    base = {
        "model.path": str(assets.model_dir),
        "model.dtype": "float32",
        "data.train": [str(assets.train_path)],
        "data.eval": [str(assets.eval_path)],
        "data.max_length": 16,
        "data.max_prompt_length": 8,
        "data.row_length": 48,
        "dpo.cache_dir": cache,
        "optim.learning_rate": 1e-3,
        "train.output_dir": out,
        "train.batch_rows": 8,
        "train.log_every": 1,
        "logging.console": False,
        "logging.tensorboard": False,
        **OVER,
    }
    return jconfig.replace(jconfig.Config(), **{**base, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The 3-step run, on a plain local path, in one go: what the interrupted URL runs must match."""
    d = tmp_path_factory.mktemp("uninterrupted")
    result = train.run(make_config(assets, str(d / "run"), str(d / "refcache")), mesh=one_device())
    assert result.step == 3 and result.stop_reason == "completed"
    return result


def _interrupted_then_resumed(assets, out: str, cache: str, callbacks=(), **overrides):
    """Run to step 2 (a callback stops it), then continue with Trainer.from_checkpoint(out)."""
    first = train.run(
        make_config(assets, out, cache, **overrides),
        callbacks=[*callbacks, lambda m: m["step"] == 2],
        mesh=one_device(),
    )
    assert first.stop_reason == "callback" and first.step == 2
    second = train.Trainer.from_checkpoint(out, mesh=one_device())
    assert second.step == 2 and all(second.reference.reused.values())  # the reference cache is found again
    return first, second.fit()


def test_file_url_run_resumes_bit_identically(assets, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    first, result = _interrupted_then_resumed(assets, run_dir.as_uri(), (tmp_path / "refcache").as_uri())
    assert first.output_dir == run_dir and result.output_dir == run_dir  # file:// is the local path
    assert result.step == 3 and result.stop_reason == "completed"
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/2", "checkpoints/3", "final/model.safetensors"):
        assert (run_dir / name).exists(), name
    assert logged_records(result.metrics_path) == logged_records(uninterrupted.metrics_path)
    assert result.eval_metrics == uninterrupted.eval_metrics


def test_object_store_run_resumes_bit_identically(assets, tmp_path, bucket, monkeypatch, uninterrupted):
    # The checkpoints stay local (see the module docstring); everything else goes to the store.
    monkeypatch.setattr(
        RunCheckpoints, "directory", property(lambda self: paths.as_path(tmp_path / "checkpoints"))
    )
    # No timed uploads: metrics.jsonl reaches the store only at checkpoints and at the end.
    monkeypatch.setattr(metrics, "REMOTE_SYNC_SECONDS", 1e9)
    uploaded = []

    def at_step_2(m):
        if m["step"] == 2 and "loss" in m:  # step 2 is logged, the checkpoint at step 1 was saved
            uploaded.extend(r["step"] for r in metrics.read_metrics("gs://bucket/run"))

    first, result = _interrupted_then_resumed(
        assets,
        "gs://bucket/run",
        "gs://bucket/refcache",
        callbacks=[at_step_2],
        **{"logging.tensorboard": True, "train.save_every": 1},
    )
    assert uploaded == [0, 1]  # the eval at 0 and step 1, uploaded with the checkpoint at step 1
    assert str(result.output_dir) == "gs://bucket/run" and str(result.final_dir) == "gs://bucket/run/final"
    assert result.step == 3 and result.stop_reason == "completed"
    assert logged_records("gs://bucket/run") == logged_records(uninterrupted.metrics_path)
    assert result.eval_metrics == uninterrupted.eval_metrics
    assert jconfig.load_config("gs://bucket/run/config.yaml").train.output_dir == "gs://bucket/run"
    keys = set(bucket)
    assert {"bucket/run/config.yaml", "bucket/run/metrics.jsonl", "bucket/run/final/config.json"} <= keys
    assert sum(k.startswith("bucket/run/tensorboard/events.out.tfevents.") for k in keys) == 2  # 2 attempts
    entries = [k for k in keys if k.startswith("bucket/refcache/") and k.endswith("/manifest.json")]
    assert sum(not k.startswith("bucket/refcache/tokens/") for k in entries) == 2  # the reference, 2 splits
    assert sum(k.startswith("bucket/refcache/tokens/") for k in entries) == 1  # the tokenised data, once
    # The same weights as the uninterrupted run's export, byte for byte, and the same tokenizer files.
    local_final = uninterrupted.final_dir
    for name in os.listdir(local_final):
        if name == "README.md":  # the model card: its config names each run's own output_dir
            continue
        assert (result.final_dir / name).read_bytes() == (local_final / name).read_bytes(), name
    assert sorted(p.name for p in result.final_dir.iterdir()) == sorted(os.listdir(local_final))
