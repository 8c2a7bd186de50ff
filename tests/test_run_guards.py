"""The run-level guards of jdpo.train.trainer: the best checkpoint kept outside the rotation and exported
(`train.keep_best`), the divergence guard (`train.divergence_factor`, `train.max_param_abs`), and resume
after SIGKILL at several points of a run, including while a checkpoint is being written."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import logged_records, one_device, run_config
from safetensors.numpy import load_file

from jdpo import config as jconfig
from jdpo.report import metrics
from jdpo.train import guards
from jdpo.train import trainer as train
from jdpo.train.checkpoint import Checkpointer


def make_config(assets, out, **overrides):
    return run_config(assets, out, **{"train.max_steps": 6, "train.log_every": 1, **overrides})


def _eval_at(records, step, name):
    (value,) = [r[name] for r in records if r["step"] == step and name in r]
    return value


# -- train.keep_best ---------------------------------------------------------------------------------


def test_keep_best_survives_the_rotation_and_a_resume_and_is_exported(assets, tmp_path):
    """On this task the eval loss rises after step 1 (a random tiny model), so eval/loss:min picks step 1,
    which keep_checkpoints=1 alone would rotate away at step 2. It is kept through a resume (orbax re-reads
    the checkpoints' metrics) and exported to best/, whose weights give the eval loss logged at step 1."""
    # The plain layout's batches give that trajectory (asserted below); the shared prompt's differ.
    cfg = make_config(assets, tmp_path / "run", **{"train.eval_every": 1, "train.keep_checkpoints": 1,
                                                   "train.keep_best": "eval/loss:min",
                                                   "data.shared_prompt": "false"})  # fmt: skip
    first = train.run(cfg, callbacks=[lambda m: m["step"] == 3], mesh=one_device())
    assert first.stop_reason == "callback" and sorted(os.listdir(first.checkpoint_dir)) == ["1", "3"]
    result = train.Trainer(cfg, mesh=one_device()).fit()
    assert result.step == 6 and sorted(os.listdir(result.checkpoint_dir)) == ["1", "6"]
    records = logged_records(result.metrics_path)
    losses = [_eval_at(records, s, "eval/loss") for s in range(1, 7)]
    assert losses[0] == min(losses) and losses[-1] > losses[0]
    assert result.best_step == 1 and result.best_dir == tmp_path / "run" / "best"
    assert json.loads((result.best_dir / "best.json").read_text()) == {
        "step": 1, "metric": "eval/loss", "value": losses[0]}  # fmt: skip
    # Both exports' model cards: the final (step 6) and best (step 1) evals side by side.
    row = f"| eval/loss | {losses[-1]:.4g} | {losses[0]:.4g} |"
    for d in (result.final_dir, result.best_dir):
        assert row in (d / "README.md").read_text()
    assert "the checkpoint of the best eval (eval/loss" in (result.best_dir / "README.md").read_text()

    from jdpo.models import from_pretrained

    tr = train.Trainer.from_checkpoint(tmp_path / "run", mesh=one_device())
    best_params = from_pretrained(str(result.best_dir), mesh=one_device())[0]
    from flax import nnx

    assert tr.evaluate(nnx.split(best_params)[1])["eval/loss"] == pytest.approx(losses[0], abs=1e-6)
    best_w = load_file(result.best_dir / "model.safetensors")
    final_w = load_file(result.final_dir / "model.safetensors")
    assert best_w.keys() == final_w.keys() and any(not np.array_equal(best_w[k], final_w[k]) for k in best_w)


def test_keep_best_is_checked_before_training(assets, tmp_path):
    with pytest.raises(jconfig.ConfigError, match=r"train.keep_best='eval/loss' must be"):
        jconfig.replace(jconfig.Config(), **{"train.keep_best": "eval/loss"})
    with pytest.raises(jconfig.ConfigError, match=r"train.keep_best='loss:min' must be"):
        jconfig.replace(jconfig.Config(), **{"train.keep_best": "loss:min"})
    no_eval = make_config(assets, tmp_path / "a", **{"data.eval": [], "train.keep_best": "eval/loss:min"})
    with pytest.raises(jconfig.ConfigError, match="needs an eval split"):
        train.Trainer(no_eval, mesh=one_device())
    # Issue 31, item 15: a typo was found at the step-0 eval, after the model load and the reference pass,
    # leaving an output directory behind; the config names the metrics of its loss settings.
    with pytest.raises(jconfig.ConfigError, match=r"no 'eval/los'.*eval/loss"):
        make_config(assets, tmp_path / "b", **{"train.keep_best": "eval/los:min"})
    assert not (tmp_path / "b").exists()
    with pytest.raises(jconfig.ConfigError, match=r"dpo.loss_type \['sigmoid'\] have no 'eval/kl'"):
        jconfig.replace(jconfig.Config(), **{"train.keep_best": "eval/kl:min"})
    for loss_type, metric in [(["kto"], "eval/kl:min"), (["orpo"], "eval/log_odds_ratio:max"),
                              (["sigmoid", "sft"], "eval/loss/sft:min")]:  # fmt: skip
        cfg = jconfig.replace(jconfig.Config(), **{"dpo.loss_type": loss_type, "train.keep_best": metric})
        assert cfg.train.keep_best == metric


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["sigmoid", "sft"], ["orpo"], ["kto"], ["bco"]])
def test_the_configs_eval_metric_names_are_those_an_eval_logs(loss_type):
    """`jdpo.losses.defaults.metric_names` (what config validation checks keep_best against, without jax)
    names exactly what `split_metrics` returns for those loss settings (under eval/)."""
    from jdpo.losses.defaults import metric_names
    from jdpo.scoring.forward import PairLogps, split_metrics

    cfg = jconfig.replace(jconfig.Config(), **{"dpo.loss_type": loss_type})
    n = 6
    rng = np.random.default_rng(0)

    def logps():
        sums = -rng.uniform(1, 5, (2, n)).astype(np.float32)
        return PairLogps(*sums, np.full(n, 3, np.int32), np.full(n, 3, np.int32), np.ones(n, bool))

    labels = np.array([1, 0] * (n // 2), np.int32) if cfg.dpo.unpaired else None
    got = split_metrics(logps(), logps(), cfg.dpo.loss_spec(), labels=labels)
    assert sorted(got) == sorted(f"eval/{name}" for name in metric_names(cfg.dpo.loss_type))


def test_keep_best_with_a_moving_reference_takes_only_reference_free_metrics():
    """Issue 31, item 5: each round (or reference update) measures eval/loss and the rewards against
    another reference (the loss restarts near ln 2), so `best/` was always the end of round 1. With a
    reference that moves, keep_best must name a metric of the policy alone (its log-probs), and says why."""
    moves = [({"train.rounds": 2}, "train.rounds=2"), ({"dpo.ref_update": "hard"}, "dpo.ref_update=hard")]
    for moving, what in moves:
        for metric in ("eval/loss:min", "eval/rewards/accuracies:max", "eval/rewards/margins:max"):
            want = rf"train.keep_best='{metric}' with {what}: .*reference.*eval/logps/chosen"
            with pytest.raises(jconfig.ConfigError, match=want):
                jconfig.replace(jconfig.Config(), **moving, **{"train.keep_best": metric})
        cfg = jconfig.replace(jconfig.Config(), **moving, **{"train.keep_best": "eval/logps/chosen:max"})
        assert cfg.train.keep_best == "eval/logps/chosen:max"


# -- the divergence guard ----------------------------------------------------------------------------


# slow (22 s): the divergence guard is covered fast by the loss-spike and steady blow-up tests below.
@pytest.mark.slow
def test_a_runaway_learning_rate_stops_the_run_before_weights_blow_up(assets, tmp_path, capsys):
    """lr 1e6 (finite loss, weights in the millions after one step) used to finish and export. `jdpo
    train` now stops at step 1 with one message (no traceback) and exit status 3, not bad input's 2."""
    from jdpo import cli

    cfg = make_config(assets, tmp_path / "run", **{"optim.learning_rate": 1e6, "optim.warmup_ratio": 0.0})
    jconfig.dump(cfg, tmp_path / "run.yaml")
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml")]) == cli.EXIT_DIVERGED == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    want = r"jdpo train: error: a parameter reached magnitude .* at step 1, over train.max_param_abs=10000: "
    assert re.search(want + r"the run diverged .*Last good: no checkpoint", err)
    assert not (tmp_path / "run" / "final").exists()
    # Off, step 1 goes through with weights past the bound (at step 2 they are NaN: the NaN stop).
    off = {"train.max_param_abs": 0.0, "train.divergence_factor": 0.0, "train.max_steps": 1,
           "train.output_dir": str(tmp_path / "off")}  # fmt: skip
    off = jconfig.replace(cfg, **off)
    assert train.run(off, mesh=one_device()).metrics["param_abs_max"] > 1e4


def test_a_loss_spike_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "run", **{"train.save_every": 2, "train.max_steps": 8})
    tr = train.Trainer(cfg, mesh=one_device())
    real = tr.steps.train_step

    def spiking(state, batch):
        state, m = real(state, batch)
        if int(state.step) == 7:
            m = dict(m, loss=m["loss"] * 1e3)
        return state, m

    tr.steps = dataclasses.replace(tr.steps, train_step=spiking)
    spike = r"loss .* at step 7 is over train.divergence_factor=100 .*checkpoint at step 6"
    with pytest.raises(guards.DivergenceError, match=spike):
        tr.fit()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4", "6"]


def _blowing_up(tr, ratio):
    """Step k's logged loss times ratio^(k - 1): a loss that grows steadily, as a too-high learning rate's."""
    real = tr.steps.train_step

    def step(state, batch):
        state, m = real(state, batch)
        return state, dict(m, loss=m["loss"] * ratio ** (int(state.step) - 1))

    tr.steps = dataclasses.replace(tr.steps, train_step=step)
    return tr


def test_a_steady_blow_up_stops_at_the_first_step_past_the_early_level_and_names_a_healthy_checkpoint(
    assets, tmp_path
):
    """Issue 31, item 6: a loss x4 each step passes 100x its start at step 5, before the running median
    has its 5 steps; after that the median rises with it, so the guard let it run and then named a diverged
    checkpoint as good. The step-1 level is a bound from step 2 on, and a checkpoint whose loss was past
    it is never named good: a run that saved diverged checkpoints with the guard off and is resumed with
    it on names the newest checkpoint within the bound."""
    every = {"train.save_every": 1, "train.keep_checkpoints": 10, "train.max_steps": 8, "train.export": False}
    cfg = make_config(assets, tmp_path / "run", **every)
    with pytest.raises(guards.DivergenceError, match=r"loss .* at step 5 .*checkpoint at step 4 "):
        _blowing_up(train.Trainer(cfg, mesh=one_device()), 4.0).fit()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == ["1", "2", "3", "4"]

    off = make_config(assets, tmp_path / "off", **every, **{"train.divergence_factor": 0.0})
    _blowing_up(train.Trainer(off, mesh=one_device()), 4.0).fit(callbacks=[lambda m: m["step"] == 6])
    on = jconfig.replace(off, **{"train.divergence_factor": 100.0})
    with pytest.raises(guards.DivergenceError, match=r"at step 7 .*checkpoint at step 4 ") as e:
        _blowing_up(train.Trainer(on, mesh=one_device()), 4.0).fit()
    assert "steps 5, 6" in str(e.value)  # the newer ones it passed over, named


def test_divergence_settings_are_validated():
    with pytest.raises(jconfig.ConfigError, match="train.divergence_factor must be 0"):
        jconfig.replace(jconfig.Config(), **{"train.divergence_factor": 0.5})
    with pytest.raises(jconfig.ConfigError, match="train.max_param_abs must be >= 0"):
        jconfig.replace(jconfig.Config(), **{"train.max_param_abs": -1.0})


# -- a full disk ----------------------------------------------------------------------------------------


def test_a_full_disk_is_found_before_training_at_a_save_and_at_the_export(assets, tmp_path, monkeypatch):
    """Issue 31, item 4: a full disk lost the run with a traceback, at a checkpoint (orbax's
    RESOURCE_EXHAUSTED) and at the export (SafetensorError). Now: too little free space where the
    filesystem says is refused before the first checkpoint write; a save that fails for space keeps the
    previous checkpoint and says how much space is needed and where; an export that fails leaves the
    checkpoint and says how to export again (the same command, which then only exports). Each is one
    message and exit status 2 (`NoSpaceError`, `ExportError`: input errors)."""
    import errno

    from safetensors import SafetensorError

    from jdpo.errors import ExportError, NoSpaceError, UserError
    from jdpo.train import diskspace
    from jdpo.train import export as exports

    assert issubclass(NoSpaceError, UserError) and issubclass(ExportError, UserError)
    out = tmp_path / "run"
    cfg = make_config(assets, out, **{"train.max_steps": 4, "train.save_every": 2})
    with monkeypatch.context() as m:
        m.setattr(diskspace, "free_bytes", lambda path: 500)
        want = rf"train.output_dir {out}: a checkpoint of this run takes about [\d.]+ [kM]B; 500 B are free"
        with pytest.raises(NoSpaceError, match=want):
            train.Trainer(cfg, mesh=one_device())
    assert not (out / "checkpoints").exists()

    real_save = Checkpointer.save

    def full_at_4(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", full_at_4)
        want = (
            rf"checkpoint at step 4 could not be written to {out / 'checkpoints'}.*No space left on device.*"
            r"takes about [\d.]+ [kM]B.*B are free there.*kept: the checkpoint at step 2"
        )
        with pytest.raises(NoSpaceError, match=want):
            train.Trainer(cfg, mesh=one_device()).fit()
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]

    def full_export(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')  # fmt: skip

    with monkeypatch.context() as m:
        m.setattr(exports, "export_model", full_export)
        want = (
            rf"the export to {out / 'final'} failed .*No space left on device.*checkpoint at step 4 in "
            rf"{out / 'checkpoints'} is intact.*run the same command again"
        )
        with pytest.raises(ExportError, match=want):
            train.Trainer(cfg, mesh=one_device()).fit()
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
    result = train.Trainer(cfg, mesh=one_device()).fit()  # only exports
    assert result.step == 4 and (result.final_dir / "model.safetensors").exists()


# -- SIGKILL fault injection -------------------------------------------------------------------------


# slow (53 s): the bit-identical resume is covered fast by test_train.py::test_resume_is_bit_identical and
# test_paths.py's resumes; this adds the SIGKILL timings.
@pytest.mark.slow
def test_sigkill_at_any_point_resumes_bit_identically(assets, tmp_path):
    """Killed (SIGKILL, no chance to clean up) after step 1 (no checkpoint yet), while step 4's checkpoint
    is being written in the background, and after step 5 (before its save): each rerun of the same
    command continues, and the finished run's metrics and weights equal an uninterrupted run's."""
    over = {"train.max_steps": 6, "train.save_every": 2, "train.eval_every": 3}
    full = train.run(make_config(assets, tmp_path / "full", **over), mesh=one_device())
    cfg_path = tmp_path / "run.yaml"
    jconfig.dump(make_config(assets, tmp_path / "run", **over), cfg_path)
    ckpts = tmp_path / "run" / "checkpoints"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    worker = Path(__file__).with_name("fault_worker.py")

    def attempt(when: str) -> int:
        return subprocess.run(
            [sys.executable, str(worker), str(cfg_path), when], env=env, timeout=300
        ).returncode

    assert attempt("step:1") == -9
    assert not ckpts.exists() or not Checkpointer(ckpts).steps()
    assert attempt("save:4") == -9
    assert Checkpointer(ckpts).steps() == [2]  # step 4 was never committed
    assert attempt("step:5") == -9
    # Step 4's save runs in the background while step 5 computes: the kill may come before its commit.
    assert Checkpointer(ckpts).steps() in ([2], [2, 4])
    assert attempt("none") == 0
    assert logged_records(tmp_path / "run" / metrics.METRICS_FILE) == logged_records(full.metrics_path)
    got, want = (
        load_file(tmp_path / "run" / "final" / "model.safetensors"),
        load_file(full.final_dir / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
