"""jdpo.parallel.distributed: cluster detection rules, the single-process no-op, and a real two-process job.

The two-process job: `tests/multihost_worker.py` is started twice on localhost (coordinator 127.0.0.1 on a
free port, gloo CPU collectives, 2 CPU devices each, 4 global), joined by `jax.distributed` through
`maybe_initialize`. While the pair runs, this process computes the same things on one device; then:
- a sharded forward + DPO loss + gradient of a tiny Llama, each process feeding only its rows, matches;
- `jdpo.train.run` of a tiny DPO task logs the same losses / rewards / grad norms / eval metrics;
- a SIGTERM that reaches only one of the two processes stops both at the same step, with a checkpoint;
- the checkpoint the pair wrote restores here, in a single process, to the single-process run's state.
The workers run with a deadline and are killed (whole process group) if they exceed it or if one fails.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multihost_worker as worker
import numpy as np
import pytest
from helpers import build_tiny_assets, one_device

from jdpo.parallel import distributed as D

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
DEADLINE_S = 240  # far above the ~60 s the pair needs on 2 loaded cores; only a hang gets here
# Timings, and what the loop extrapolates from process 0's rows alone (its token counts times the number
# of processes): these are estimates in a multi-process run, not exact global numbers.
NOT_COMPARED = {"step_time", "tokens_per_sec", "mfu", "padding_fraction"}
TRAIN_STEPS = 6  # the schedule's length; both runs stop early, at STOP_AT:
STOP_AT = 3  # the single process by a callback, the pair by a SIGTERM that reaches process 1 only


# ------------------------------------------------------------------------------------------------
# Detection rules (pure functions of the environment; nothing is initialised)
# ------------------------------------------------------------------------------------------------


def detect(env, **kw):
    return D.detect_cluster(env, tpu_vm=kw.pop("tpu_vm", False), **kw)


def test_nothing_detected_is_single_process():
    spec = detect({"HOME": "/root"})
    assert spec.kind == "single" and not spec.multi_process


def test_explicit_environment():
    env = {"JDPO_COORDINATOR": "10.0.0.2:8476", "JDPO_NUM_PROCESSES": "4", "JDPO_PROCESS_ID": "3"}
    spec = detect({**env, "JDPO_LOCAL_DEVICE_IDS": "0, 1"})
    assert (spec.kind, spec.coordinator, spec.num_processes, spec.process_id) == (
        "explicit",
        "10.0.0.2:8476",
        4,
        3,
    )
    assert spec.local_device_ids == (0, 1)
    # Flags win over the environment, and explicit settings win over a detected cluster.
    spec = detect({**env, "SLURM_NTASKS": "8"}, process_id=1, coordinator="h:1")
    assert (spec.kind, spec.coordinator, spec.process_id) == ("explicit", "h:1", 1)
    assert detect({**env, "JDPO_NUM_PROCESSES": "1", "JDPO_PROCESS_ID": "0"}).kind == "single"


@pytest.mark.parametrize(
    "env, match",
    [
        ({"JDPO_COORDINATOR": "h:1"}, "JDPO_NUM_PROCESSES, JDPO_PROCESS_ID is not"),
        ({"JDPO_NUM_PROCESSES": "2", "JDPO_PROCESS_ID": "0"}, "JDPO_COORDINATOR is not"),
        ({"JDPO_COORDINATOR": "h", "JDPO_NUM_PROCESSES": "2", "JDPO_PROCESS_ID": "0"}, "host:port"),
        ({"JDPO_COORDINATOR": "h:1", "JDPO_NUM_PROCESSES": "2", "JDPO_PROCESS_ID": "2"}, "process id <"),
        ({"JDPO_COORDINATOR": "h:1", "JDPO_NUM_PROCESSES": "two", "JDPO_PROCESS_ID": "0"}, "integer"),
        ({"JDPO_DISTRIBUTED": "maybe"}, "expected auto"),
    ],
)
def test_bad_explicit_settings_name_the_variable(env, match):
    with pytest.raises(D.DistributedError, match=match):
        detect(env)


def test_slurm():
    env = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}  # fmt: skip
    spec = detect(env)
    assert (spec.kind, spec.num_processes, spec.process_id, spec.detection_method) == ("slurm", 4, 2, "slurm")
    assert spec.coordinator is None  # jax reads it from the node list
    # A batch script running python directly is a one-task step of a larger allocation.
    assert detect({**env, "SLURM_STEP_NUM_TASKS": "1"}).kind == "single"
    assert detect({**env, "SLURM_NTASKS": "1"}).kind == "single"
    assert detect({k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}).kind == "single"


def test_open_mpi():
    env = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2"}
    assert detect(env).kind == "ompi"
    assert detect({**env, "OMPI_COMM_WORLD_SIZE": "1"}).kind == "single"


@pytest.mark.parametrize(
    "env",
    [
        {"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3"},
        {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"},
        {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"},
        {"MEGASCALE_NUM_SLICES": "2"},
        {"CLOUD_TPU_TASK_ID": "0"},
    ],
)
def test_tpu_pod_environment(env):
    spec = detect(env)
    assert spec.kind == "tpu"
    # jax's own TPU detection fills in everything: initialize() is called without arguments.
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.detection_method) == (None,) * 4


def test_tpu_vm_without_environment_asks_jax_and_one_host_is_not_a_pod():
    assert detect({}, tpu_vm=True).kind == "tpu"  # GCE TPU VMs: the worker list is in the VM metadata
    assert detect({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True).kind == "single"
    assert detect({"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"


def test_switch():
    pod = {"TPU_WORKER_HOSTNAMES": "a,b"}
    assert detect({**pod, "JDPO_DISTRIBUTED": "0"}).kind == "single"
    assert detect({**pod, "JDPO_DISTRIBUTED": "auto"}).kind == "tpu"
    assert detect({"JDPO_DISTRIBUTED": "1"}).kind == "forced"


def test_this_machine_is_not_a_tpu_vm():
    assert D.on_cloud_tpu_vm() is False


# ------------------------------------------------------------------------------------------------
# Single process: maybe_initialize is a no-op, the helpers degrade to trivial answers
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh():
    D._reset_for_tests()
    yield
    D._reset_for_tests()


def test_single_process_is_a_no_op_and_idempotent(fresh):
    info = D.maybe_initialize(env={})
    assert not info.initialized and info.process_count == 1 and info.process_index == 0
    assert str(info) == "single process (no cluster detected)"
    assert D.maybe_initialize(env={"TPU_WORKER_HOSTNAMES": "a,b"}) is info  # the first answer stands
    assert not jax.distributed.is_initialized()


def test_cluster_after_jax_started_is_a_clear_error(fresh):
    jax.devices()  # the backend is running, as it is in any test process
    env = {"JDPO_COORDINATOR": "127.0.0.1:1", "JDPO_NUM_PROCESSES": "2", "JDPO_PROCESS_ID": "1"}
    with pytest.raises(D.DistributedError, match="first in main"):
        D.maybe_initialize(env=env)
    assert not jax.distributed.is_initialized()


def test_helpers_in_one_process():
    assert D.is_main_process() and D.process_count() == 1 and D.process_index() == 0
    D.sync("nothing to wait for")
    assert D.broadcast_from_main({"x": 3}) == {"x": 3}
    assert D.any_process(True) is True and D.any_process(False) is False

    @D.main_process_only
    def write(x):
        """Docstring kept."""
        return x + 1

    assert write(1) == 2 and write.__doc__ == "Docstring kept."


def test_argparse_flags():
    import argparse

    p = argparse.ArgumentParser()
    D.add_arguments(p)
    args = p.parse_args(["--coordinator", "h:9", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id, args.local_device_ids) == (
        "h:9",
        2,
        1,
        None,
    )


# ------------------------------------------------------------------------------------------------
# Two processes on localhost
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(process_id: int, port: int) -> dict:
    # Nothing from this machine's environment may look like another cluster to the workers.
    prefixes = ("JDPO_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "CLOUD_TPU_", "JAX_COORDINATOR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        JAX_PLATFORMS="cpu",
        JDPO_COORDINATOR=f"127.0.0.1:{port}",
        JDPO_NUM_PROCESSES="2",
        JDPO_PROCESS_ID=str(process_id),
        JDPO_INIT_TIMEOUT="60",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


class Pair:
    """Two worker processes, each in its own process group (so a kill takes their children too)."""

    def __init__(self, args: list[str], out: Path):
        self.out = out
        port = free_port()
        self.logs = [out / f"worker{i}.log" for i in range(2)]
        self.procs = []
        for i in range(2):
            with open(self.logs[i], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), "--out", str(out), *args],
                        env=worker_env(i, port),
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        self.started = time.monotonic()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait(timeout=30)

    def tails(self) -> str:
        return "\n".join(f"--- worker {i} ---\n" + log.read_text()[-3000:] for i, log in enumerate(self.logs))

    def wait(self, deadline_s: float) -> None:
        """Until both exit 0; fails (after killing both) on a timeout or the first failure, since the
        survivor of a failed pair would wait for its peer until jax's heartbeat timeout."""
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if any(c not in (None, 0) for c in codes):
                    time.sleep(2)  # let the other one finish writing its error, if it has one
                    pytest.fail(
                        f"a worker failed (exit codes {[p.poll() for p in self.procs]}):\n{self.tails()}"
                    )
                if all(c == 0 for c in codes):
                    return
                if time.monotonic() - self.started > deadline_s:
                    pytest.fail(f"the workers did not finish within {deadline_s} s:\n{self.tails()}")
                time.sleep(0.2)
        finally:
            self.kill()


def test_a_failed_worker_fails_the_test_and_no_process_is_left(tmp_path):
    pair = Pair(["--tasks", "fail"], tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"exit codes \[(-9|None|1), 1\]") as failure:
        pair.wait(DEADLINE_S)
    assert "RuntimeError: process 1 fails on purpose" in str(failure.value)  # its traceback is shown
    assert time.monotonic() - pair.started < 60  # noticed at once, not after jax's heartbeat timeout
    assert all(p.poll() is not None for p in pair.procs)  # process 0 (waiting in a barrier) is gone too


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Start the pair, compute the single-process references meanwhile, then collect the pair's output."""
    from jdpo.train import trainer as train

    tmp = tmp_path_factory.mktemp("multihost")
    assets = build_tiny_assets(tmp / "assets", max_operand=19, eval_pairs=16)
    out = tmp / "pair"
    out.mkdir()
    pair = Pair(
        ["--tasks", "model,train", "--model-dir", str(assets.model_dir), "--train", str(assets.train_path),
         "--eval", str(assets.eval_path), "--steps", str(TRAIN_STEPS), "--sigterm-step", str(STOP_AT)],
        out,
    )  # fmt: skip
    try:
        # The same computations in this process on one device, while the workers run.
        single_model = worker.model_task(one_device())
        cfg = worker.train_config(assets, tmp / "single", TRAIN_STEPS)
        trainer = train.Trainer(cfg, mesh=one_device())
        single_run = trainer.fit(callbacks=[lambda m: m["step"] == STOP_AT and "loss" in m])
    except BaseException:
        pair.kill()
        raise
    pair.wait(DEADLINE_S)
    return {
        "pair_out": out,
        "reports": [json.loads((out / f"report.p{i}.json").read_text()) for i in range(2)],
        "pair_model": [dict(np.load(out / f"model.p{i}.npz")) for i in range(2)],
        "single_model": single_model,
        "trainer": trainer,
        "single_run": single_run,
    }


def test_two_processes_joined_one_job(results):
    for i, r in enumerate(results["reports"]):
        assert (r["kind"], r["process_index"], r["process_count"]) == ("explicit", i, 2)
        assert (r["local_devices"], r["global_devices"]) == (2, 4)
        assert r["is_main"] == (i == 0)
        assert r["broadcast"] == 100  # process 0's value reached both
        assert r["any_of_1"] is True and r["any_of_none"] is False
        assert r["info"].startswith(f"process {i} of 2 (explicit")


def test_sharded_loss_and_gradient_match_one_process(results):
    want = results["single_model"]
    for got in results["pair_model"]:  # both processes hold the whole (gathered) answer
        assert got["spread"] == 4  # parameters really were spread over both processes' devices
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["logps"], want["logps"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got["grads"], want["grads"], rtol=1e-4, atol=1e-6)
    assert abs(float(want["loss"]) - math.log(2)) < 0.05  # random init: close to, but not exactly, ln 2


def _records(path: Path) -> list[dict]:
    from jdpo.report import metrics

    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in metrics.read_metrics(path)]


def test_two_process_training_logs_the_single_process_losses(results):
    want = _records(results["single_run"].metrics_path)
    got = _records(results["pair_out"] / "train" / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert any("eval/loss" in r for r in got) and sum("loss" in r for r in got) == STOP_AT
    for a, b in zip(want, got, strict=True):
        assert set(a) == set(b)
        for k, v in a.items():
            if k.endswith("accuracies") and a["step"] <= 1:
                # The eval at step 0 and step 1's forward see the initial policy, which is the
                # reference: every reward is float noise around 0 (the reference pass is another
                # program), so its sign is arbitrary. Margins and rewards are still compared to 1e-5.
                continue
            # Accuracy counts reward signs; a pair within float noise of a tie may flip.
            tol = 0.02 if k.endswith("accuracies") else 1e-5
            assert b[k] == pytest.approx(v, rel=1e-4, abs=tol), (a["step"], k)
    assert (results["single_run"].step, results["single_run"].stop_reason) == (STOP_AT, "callback")


def test_two_process_counters_are_summed_over_processes(results):
    """tokens_per_sec and padding_fraction count the rows of every process (each host feeds different
    rows), not process 0's rows times the process count: the pair's global counts equal one process's."""
    from jdpo.report import metrics

    def counted(path):
        return [
            (r["step"], round(r["tokens_per_sec"] * r["step_time"]), round(r["padding_fraction"], 9))
            for r in metrics.read_metrics(path)
            if "tokens_per_sec" in r
        ]

    want = counted(results["single_run"].metrics_path)
    assert len(want) == STOP_AT and counted(results["pair_out"] / "train" / "run" / "metrics.jsonl") == want


def test_a_sigterm_on_one_worker_stops_both_at_the_same_step(results):
    for r in results["reports"]:
        assert (r["train"]["step"], r["train"]["stop_reason"]) == (STOP_AT, "sigterm")


def test_checkpoint_of_the_pair_restores_in_one_process(results):
    from jdpo.train.checkpoint import Checkpointer, abstract_like

    trainer = results["trainer"]
    target = abstract_like(trainer.state.to_checkpoint())  # one device, this process only
    with Checkpointer(results["pair_out"] / "train" / "run" / "checkpoints") as ckpt:
        assert ckpt.steps() == [STOP_AT]  # written at the stop, by both processes together
        state, meta = ckpt.restore(target)
    assert meta["step"] == STOP_AT and meta["data"] == trainer.data.batches.state()
    assert int(state["step"]) == STOP_AT
    ours = jax.tree.leaves(trainer.state.to_checkpoint())
    theirs = jax.tree.leaves(state)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert b.sharding == a.sharding  # restored straight onto this process's single device
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
