"""jdpo.train.trainer: the step's numbers (ln 2 at the start, cached == online, 1x8 == 8x1 accumulation, one
compilation), the loop's guarantees (bit-identical resume, SIGTERM checkpoint, NaN stop), the HF export,
and a sharded run on 8 simulated CPU devices matching 1 device.

All runs share one tiny model (hidden 32, 2 layers, vocab 128) and one tiny arithmetic task (conftest's
`assets`), so the compiled step functions are shared between tests (`compiled_steps` is cached on its
settings).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import jax
import numpy as np
import pytest
from helpers import TIMING, logged_records, one_device, run_config
from helpers import train_steps as steps

from jdpo import config as jconfig
from jdpo.parallel.sharding import make_mesh
from jdpo.train import guards, step
from jdpo.train import trainer as train


def make_config(assets, out, **overrides):
    return run_config(assets, out, **{"train.max_steps": 6, "train.log_every": 1, **overrides})


def assert_close_metrics(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k, v in a.items():
        tol = atol
        if k == "rewards/accuracies":
            # Accuracy counts reward signs. At step 1 (policy == reference) every reward is float noise
            # around 0, so it is meaningless; later a pair within noise of a tie may flip.
            if abs(a["rewards/chosen"]) + abs(a["rewards/rejected"]) < 1e-4:
                continue
            tol = 1.01 / a["pairs"]
        assert b[k] == pytest.approx(v, rel=1e-4, abs=tol), k


def test_first_step_loss_is_ln2_with_cached_reference(assets, tmp_path):
    tr = train.Trainer(make_config(assets, tmp_path / "run"), mesh=one_device())
    (m,) = steps(tr, 1)
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(m["rewards/chosen"]) < 1e-5 and abs(m["rewards/margins"]) < 1e-5
    assert m["pairs"] > 8  # packing put several pairs in a row
    for name in ("rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm"):
        assert math.isfinite(m[name])


def test_cached_and_online_reference_give_the_same_losses(assets, tmp_path):
    cached = train.Trainer(make_config(assets, tmp_path / "a"), mesh=one_device())
    online = train.Trainer(
        make_config(assets, tmp_path / "b", **{"dpo.reference": "online"}), mesh=one_device()
    )
    assert "ref_params" in online.state.parts() and "ref_params" not in cached.state.parts()
    for a, b in zip(steps(cached, 3), steps(online, 3), strict=True):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert cached.evaluate() == pytest.approx(online.evaluate(), rel=1e-4, abs=1e-5)


def test_accumulation_1x8_equals_8x1(assets, tmp_path):
    # The same 8 rows per step: one micro-batch of 8 rows, or 8 micro-batches of 1 row.
    big = train.Trainer(make_config(assets, tmp_path / "a"), mesh=one_device())
    small = train.Trainer(
        make_config(assets, tmp_path / "b", **{"train.batch_rows": 1, "train.grad_accum": 8}),
        mesh=one_device(),
    )
    assert big.data.total_steps == small.data.total_steps
    for a, b in zip(steps(big, 2), steps(small, 2), strict=True):
        assert a["pairs"] == b["pairs"]
        assert_close_metrics(a, b)
    for x, y in zip(
        jax.tree.leaves(big.state.params), jax.tree.leaves(small.state.params), strict=True
    ):
        # Adam divides by sqrt(v) + eps, so a parameter whose gradient is near eps moves by an amount
        # sensitive to float-rounding differences of the two summation orders (seen: 7e-6): compare to
        # 5% of one step's size (lr 1e-3). Loss and grad_norm above are the tight check of accumulation.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-5)


def test_step_compiles_once(assets, tmp_path):
    # Fresh compiled functions: shared ones would already hold what other tests compiled (e.g. step
    # 2's signature), hiding a second compilation.
    step.compiled_steps.cache_clear()
    tr = train.Trainer(make_config(assets, tmp_path / "run"), mesh=one_device())
    steps(tr, 1)
    tr.evaluate()  # the eval step compiles on its first use
    cached = tr.steps.train_step._cache_size()
    assert cached == 1
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        steps(tr, 3)
        tr.evaluate()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert tr.steps.train_step._cache_size() == cached


def test_resume_is_bit_identical(assets, tmp_path):
    over = {"train.max_steps": 6, "train.save_every": 3, "train.eval_every": 2, "train.export": False}
    full = train.run(make_config(assets, tmp_path / "full", **over), mesh=one_device())
    assert full.stop_reason == "completed" and full.step == 6

    cfg = make_config(assets, tmp_path / "resumed", **over)
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 4], mesh=one_device())
    assert first.stop_reason == "callback" and first.step == 4
    second = train.Trainer(cfg, mesh=one_device())
    assert all(second.reference.reused.values())  # the reference cache is reused, not recomputed
    result = second.fit()
    assert result.step == 6 and result.stop_reason == "completed"
    want, got = logged_records(full.metrics_path), logged_records(result.metrics_path)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want  # every logged value (timings aside) is bit-identical
    assert result.eval_metrics == full.eval_metrics


def test_sigterm_saves_a_checkpoint_and_returns(assets, tmp_path):
    def preempt(m):
        if m["step"] == 2 and "loss" in m:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = train.run(make_config(assets, tmp_path / "run"), callbacks=[preempt], mesh=one_device())
    assert result.stop_reason == "sigterm" and result.step == 2 and result.final_dir is None
    assert sorted(os.listdir(result.checkpoint_dir)) == ["2"]
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
    cfg = make_config(assets, tmp_path / "run", **{"train.save_every": 2, "train.max_steps": 6})
    tr = train.Trainer(cfg, mesh=one_device())
    real = tr.steps.train_step

    def poisoned(state, batch):
        state, m = real(state, batch)
        if int(state.step) == 3:  # the step just taken was step 3
            m = dict(m, loss=m["loss"] * np.nan)
        return state, m

    tr.steps = dataclasses.replace(tr.steps, train_step=poisoned)
    with pytest.raises(guards.NonFiniteLossError, match=r"at step 3\b.*checkpoint at step 2"):
        tr.fit()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    assert not (tmp_path / "run" / "final").exists()


def test_non_finite_weights_with_a_finite_loss_are_never_checkpointed(assets, tmp_path):
    """A step whose loss is finite but whose update left NaN weights (the loss of the NEXT step would
    show it) stops at that step, before it is saved: every checkpoint on disk holds finite weights."""
    cfg = make_config(assets, tmp_path / "run", **{"train.save_every": 1, "train.max_steps": 6})
    tr = train.Trainer(cfg, mesh=one_device())
    real = tr.steps.train_step

    def overflowing(state, batch):
        if int(state.step) == 2:
            # Adam's second moment made negative: step 3's loss (of finite weights) is finite, but its
            # update divides by sqrt(nu) < 0 and leaves NaN weights.
            clip, (adam, *rest) = state.opt_state
            adam = adam._replace(nu=jax.tree.map(lambda x: -np.ones_like(x), adam.nu))
            state = state.replace(opt_state=(clip, (adam, *rest)))
        return real(state, batch)

    tr.steps = dataclasses.replace(tr.steps, train_step=overflowing)
    with pytest.raises(guards.NonFiniteLossError, match=r"parameters or optimizer state at step 3\b.*step 2"):
        tr.fit()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]


def test_export_loads_in_transformers_with_the_same_logits(assets, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jdpo.models import from_pretrained

    tr = train.Trainer(make_config(assets, tmp_path / "run", **{"train.max_steps": 2}), mesh=one_device())
    final = tr.fit().final_dir
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(final)
    ids = np.asarray([tok("12+7=19")["input_ids"]], np.int32)
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    trained = train.nnx.merge(tr.graphdef, tr.state.params)  # the policy as it left training
    np.testing.assert_allclose(np.asarray(trained(ids)), want, atol=1e-4, rtol=1e-4)
    reloaded, _ = from_pretrained(final)
    np.testing.assert_allclose(np.asarray(reloaded(ids)), want, atol=1e-4, rtol=1e-4)


# slow (15 s): sharded forwards by tests/test_sharding.py, sharded runs by test_distributed.py.
@pytest.mark.slow
def test_sharded_run_matches_one_device(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "one", **{"train.max_steps": 3})
    one = train.Trainer(cfg, mesh=one_device())
    eight = train.Trainer(
        make_config(assets, tmp_path / "eight", **{"train.max_steps": 3}), mesh=make_mesh(2, 2, 2)
    )
    assert max(len(x.sharding.device_set) for x in jax.tree.leaves(eight.state.params)) == 8
    # Adam's moments are sharded exactly like the parameters.
    mu = eight.state.opt_state[1][0].mu  # chain(clip, adamw): adamw.scale_by_adam
    for p, m in zip(jax.tree.leaves(eight.state.params), jax.tree.leaves(mu), strict=True):
        assert m.sharding == p.sharding
    for a, b in zip(steps(one, 3), steps(eight, 3), strict=True):
        assert_close_metrics(a, b)
    for x, y in zip(
        jax.tree.leaves(one.state.params), jax.tree.leaves(eight.state.params), strict=True
    ):
        # As in the accumulation test: a parameter whose gradient is near Adam's eps moves by an amount
        # sensitive to the summation order of the sharded reductions (seen: 4.5e-5 on one of 1024 entries
        # on an AMD EPYC): 5% of one step (lr 1e-3). The metrics above are the tight check.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-5)


def test_early_stop_when_eval_accuracy_reaches_the_ceiling(assets, tmp_path):
    over = {"train.eval_every": 2, "train.early_stop_accuracy": 1e-6, "train.export": False}
    seen = []
    result = train.run(
        make_config(assets, tmp_path / "run", **over), callbacks=[seen.append], mesh=one_device()
    )
    assert result.stop_reason == "early_stop" and result.step == 2
    assert result.eval_metrics["eval/rewards/accuracies"] > 0
    assert [r["step"] for r in seen if "eval/loss" in r] == [0, 2]  # callbacks get eval records too
    assert sorted(os.listdir(result.checkpoint_dir)) == ["2"]


# slow (14 s): buckets by tests/test_data_batching.py, accumulation by the tests above.
@pytest.mark.slow
def test_unpacked_length_buckets_with_accumulation(assets, tmp_path):
    # One pair per row in length buckets: micro-batches of different lengths share a step.
    over = {"data.packing": False, "data.row_length": 64, "train.grad_accum": 2, "train.batch_rows": 4}
    tr = train.Trainer(make_config(assets, tmp_path / "run", **over), mesh=one_device())
    assert tr.data.layout.max_pairs_per_row == 1 and len(tr.data.batches.buckets) > 1
    (m,) = steps(tr, 1)
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-5) and m["pairs"] == 8


def test_batch_rows_must_divide_over_the_mesh(assets, tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_rows=6 must divide over the 4 row shards"):
        train.Trainer(
            make_config(assets, tmp_path / "run", **{"train.batch_rows": 6}), mesh=make_mesh(2, 2, 2)
        )


def test_python_api_callbacks_from_checkpoint_evaluate_generate(assets, tmp_path):
    """The notebook API: jdpo.Trainer(config).fit(callbacks=...), evaluate(), generate(), and
    Trainer.from_checkpoint on the output directory (newest) or on one checkpoint directory."""
    import jdpo
    from jdpo.scoring.generate import Generator, SamplingParams

    out = tmp_path / "run"
    cfg = make_config(assets, out, **{"train.max_steps": 3, "train.save_every": 1})
    seen = []
    tr = jdpo.Trainer(cfg, mesh=one_device())
    result = tr.fit(callbacks=[lambda m: seen.append((m["step"], "loss" in m))])
    assert [s for s, is_train in seen if is_train] == [1, 2, 3] and (0, False) in seen
    again = jdpo.Trainer.from_checkpoint(out, mesh=one_device())
    assert again.step == 3 and int(again.state.step) == 3
    for a, b in zip(jax.tree.leaves(tr.state.params), jax.tree.leaves(again.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.evaluate() == pytest.approx(result.eval_metrics, rel=1e-6, abs=1e-7)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    want = Generator.from_pretrained(result.final_dir).generate(["12+7="], greedy)
    assert again.generate(["12+7="], greedy)[0]["completion"] == want[0]["completion"]
    # An older checkpoint can be inspected, but continuing it would overwrite the newer ones.
    two = jdpo.Trainer.from_checkpoint(out / "checkpoints" / "2", mesh=one_device())
    assert two.step == 2 and not np.array_equal(
        np.asarray(jax.tree.leaves(two.state.params)[0]),
        np.asarray(jax.tree.leaves(tr.state.params)[0]),
    )
    with pytest.raises(ValueError, match="would overwrite them"):
        two.fit()
    with pytest.raises(FileNotFoundError, match="neither a run's output directory"):
        jdpo.Trainer.from_checkpoint(tmp_path, mesh=one_device())


def test_a_second_run_on_a_locked_output_directory_refuses_and_a_dead_runs_lock_is_taken_over(
    assets, tmp_path, caplog
):
    """Two runs in one output directory would interleave metrics and checkpoints: the second refuses,
    naming the first; the lock file a killed run leaves behind does not block the next one."""
    import json as _json

    from jdpo.train.runlock import LOCK_FILE, RunLock, RunLockedError

    out = tmp_path / "run"
    cfg = make_config(assets, out, **{"train.max_steps": 1, "train.export": False})
    tr = train.Trainer(cfg, mesh=one_device())
    with RunLock(out):  # a live run holds the directory
        with pytest.raises(RunLockedError, match=rf"{out} is in use by another jdpo run: pid {os.getpid()}"):
            tr.fit()
    assert not (out / "metrics.jsonl").exists()  # refused before writing anything
    # A run killed with SIGKILL leaves its record but no lock (the kernel dropped it).
    (out / LOCK_FILE).write_text(_json.dumps({"host": "h", "pid": 2**22 + 7, "started": "then"}))
    with caplog.at_level("WARNING", logger="jdpo.train.runlock"):
        assert tr.fit().step == 1
    assert "taking over the lock left by pid 4194311" in caplog.text
    assert (out / LOCK_FILE).read_text() == ""  # released on exit


def test_resume_refuses_a_changed_config_before_the_reference_pass_and_keeps_every_config(assets, tmp_path):
    """A resume with other optimisation settings is refused with a diff (before any forward pass) unless
    train.allow_config_change; then config.yaml stays the first run's and config.<step>.yaml is added.
    Other data is refused too, also before the reference pass."""
    out = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text(assets.train_path.read_text())
    base = {"train.max_steps": 2, "train.export": False, "data.train": [str(data)]}
    train.Trainer(make_config(assets, out, **base), mesh=one_device()).fit()
    cache = tmp_path / "refcache"
    entries = sorted(p.name for p in cache.iterdir())
    changed = make_config(
        assets, out, **{**base, "train.max_steps": 3, "dpo.beta": 0.2, "train.log_every": 2}
    )
    with pytest.raises(
        jconfig.ConfigError, match=r"(?s)dpo\.beta: 0\.1 -> 0\.2.*train\.max_steps: 2 -> 3"
    ) as e:
        train.Trainer(changed, mesh=one_device())
    assert "log_every" not in str(e.value)  # logging cadence may change on resume
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-5]))  # the same file, other pairs
    with pytest.raises(jconfig.ConfigError, match="data or batch settings differ"):
        train.Trainer(make_config(assets, out, **base), mesh=one_device())
    data.write_text("".join(lines))
    assert sorted(p.name for p in cache.iterdir()) == entries  # refused before any reference pass
    allowed = jconfig.replace(changed, **{"train.allow_config_change": True})
    assert train.Trainer(allowed, mesh=one_device()).fit().step == 3
    assert jconfig.load_config(out / "config.yaml").dpo.beta == 0.1  # the first run's, kept
    assert jconfig.load_config(out / "config.2.yaml").dpo.beta == 0.2  # the resume's, added


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(assets, tmp_path, caplog, damage):
    """A truncated file (orbax cannot load it) or changed bytes (orbax would load them silently; the
    fingerprint saved with the state catches them) in the newest checkpoint: the resume says which step
    it skipped and why, moves it aside (not deleted) and continues from the previous one, reaching the
    uninterrupted run's metrics."""
    out = tmp_path / "run"
    every_step = {"train.max_steps": 3, "train.save_every": 1, "train.keep_checkpoints": 3}
    cfg = make_config(assets, out, **every_step, **{"train.export": False})
    full = train.Trainer(cfg, mesh=one_device()).fit()
    data = max((out / "checkpoints" / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 3])
    else:
        mid = len(raw) // 2
        raw[mid : mid + 8] = bytes(b ^ 0x5A for b in raw[mid : mid + 8])
        data.write_bytes(raw)
    (out / "metrics.jsonl").unlink()
    with caplog.at_level("WARNING", logger="jdpo.train.trainer"):
        tr = train.Trainer(cfg, mesh=one_device())
        resumed = tr.fit()
    assert "checkpoint at step 3 is damaged" in caplog.text and "resuming from step 2" in caplog.text
    assert (out / "checkpoints.damaged" / "3").is_dir()  # kept for a post-mortem
    assert resumed.step == 3 and resumed.stop_reason == "completed"
    assert {k: v for k, v in resumed.metrics.items() if k not in TIMING} == pytest.approx(
        {k: v for k, v in full.metrics.items() if k not in TIMING}, rel=1e-6, abs=1e-7
    )


def test_a_resume_on_a_base_changed_in_place_is_refused_naming_both_fingerprints(assets, tmp_path, caplog):
    """The weights at model.path changed between a stop and the resume (issue 31, item 1): the policy
    would continue from the checkpoint while the reference is recomputed from the new weights, two models
    mixed with exit 0. The checkpoint records the base's fingerprint (and the reference cache keys); the
    resume is refused before the reference pass, naming both, unless train.allow_base_change, which says
    what it does."""
    import dataclasses
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(assets.model_dir, model)
    out = tmp_path / "run"
    cfg = make_config(dataclasses.replace(assets, model_dir=model), out,
                      **{"train.max_steps": 3, "train.export": False})  # fmt: skip
    train.run(cfg, callbacks=[lambda m: m["step"] == 1], mesh=one_device())
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + np.float32(0.01)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    cache = tmp_path / "refcache"
    entries = sorted(p.name for p in cache.iterdir())
    with pytest.raises(jconfig.ConfigError, match=r"model\.path .* changed") as e:
        train.Trainer(cfg, mesh=one_device())
    fingerprints = re.findall(r"\b[0-9a-f]{16}\b", str(e.value))
    assert len(set(fingerprints)) == 2 and "train.allow_base_change" in str(e.value)
    assert sorted(p.name for p in cache.iterdir()) == entries  # refused before the reference pass
    allowed = jconfig.replace(cfg, **{"train.allow_base_change": True})
    with caplog.at_level("WARNING", logger="jdpo.train.resume"):
        result = train.Trainer(allowed, mesh=one_device()).fit()
    assert result.step == 3
    assert "train.allow_base_change" in caplog.text and "reference" in caplog.text
    assert all(f in caplog.text for f in fingerprints)
    # The checkpoints from here on record the new base: a plain resume no longer refuses.
    assert train.Trainer(cfg, mesh=one_device()).restore() == 3


def test_the_run_lock_is_taken_first_and_held_from_construction_until_fit_ends_or_close(assets, tmp_path):
    """Issue 31, item 14: the lock was taken by `fit`, after the model load and the reference pass, so two
    runs started together on one directory both loaded and computed before one was refused. A Trainer
    takes it first (a held directory is refused before anything is read or computed) and holds it until
    its fit ends or it is closed; another process cannot take it meanwhile."""
    import subprocess
    import sys

    from jdpo.train.runlock import LOCK_FILE, RunLock, RunLockedError

    out = tmp_path / "run"
    cfg = make_config(assets, out, **{"train.max_steps": 1, "train.export": False,
                                      "dpo.cache_dir": str(tmp_path / "cache")})  # fmt: skip
    with RunLock(out):  # another run holds the directory
        with pytest.raises(RunLockedError, match=rf"{out} is in use by another jdpo run"):
            train.Trainer(cfg, mesh=one_device())
    assert not (tmp_path / "cache").exists() and os.listdir(out) == [LOCK_FILE]  # nothing loaded or computed

    take = f"from jdpo.train.runlock import RunLock; RunLock({str(out)!r}).__enter__()"

    def other_process_can_take_it() -> bool:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-c", take], capture_output=True, env=env).returncode == 0

    tr = train.Trainer(cfg, mesh=one_device())
    assert not other_process_can_take_it()  # held from construction
    tr.close()
    assert other_process_can_take_it()
    tr = train.Trainer(cfg, mesh=one_device())
    assert tr.fit().step == 1 and other_process_can_take_it()  # released when fit ends
    with train.Trainer(cfg, mesh=one_device()) as again:  # a context manager closes it
        assert again.step == 0 and not other_process_can_take_it()
    assert other_process_can_take_it()
