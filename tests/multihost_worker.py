"""One process of the two-process test in tests/test_distributed.py (also importable for its helpers).

    python tests/multihost_worker.py --tasks model,train --out DIR [--model-dir ... --train ... --eval ...]

Run by the test with `JDPO_COORDINATOR`, `JDPO_NUM_PROCESSES=2`, `JDPO_PROCESS_ID` in the environment:
the process joins the job through `jdpo.parallel.distributed.maybe_initialize` with 2 CPU devices of its own (4
global), then runs the tasks and writes `DIR/<task>.p<process>.npz` / `.json` for the test to compare with
a single-process run of the same functions (`model_task`, `train_config`).

Nothing heavy is imported at module level: the device count has to be set before JAX starts, and the
test process (8 devices, from conftest.py) imports this module for the shared helpers. The tiny model and
run config come from tests/helpers.py (importable: a script's own folder is on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

T0 = time.perf_counter()

LOCAL_DEVICES = 2  # CPU devices of each worker process
ROWS, LENGTH = 8, 16  # the global batch of the model task: [B, T]


def tiny_config():
    """A tiny Llama (GQA, untied) for the model task."""
    from helpers import tiny_hf_config

    from jdpo.models import ModelConfig

    return ModelConfig.from_hf(
        tiny_hf_config("llama", vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64)
    )


def global_batch(seed: int = 0) -> dict:
    """The model task's whole batch as numpy: rows 2k / 2k+1 are the chosen / rejected of pair k (so a
    pair never straddles two processes), with fixed reference log-probs per pair."""
    import numpy as np

    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, 64, (ROWS, LENGTH), dtype=np.int32)
    mask = np.zeros((ROWS, LENGTH), np.float32)
    for r in range(ROWS):  # a prompt of 3..7 tokens, then the completion is scored
        mask[r, rng.integers(3, 8) :] = 1.0
    return {
        "input_ids": input_ids,
        "targets": np.roll(input_ids, -1, axis=1),
        "loss_mask": mask,
        "ref_logps": rng.normal(-60.0, 3.0, (ROWS,)).astype(np.float32),
    }


def model_task(mesh) -> dict:
    """Sharded forward + DPO loss + gradient of `tiny_config` on `mesh`, this process feeding only its
    rows of `global_batch` (`jax.make_array_from_process_local_data`). Returns numpy: the loss, the
    per-row log-probs and the flattened gradient, the same on every process."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    from jdpo.losses import logprobs
    from jdpo.losses import pairwise as losses
    from jdpo.models import init_model
    from jdpo.parallel.sharding import batch_sharding

    model = init_model(tiny_config(), seed=0, mesh=mesh)
    graphdef, params = nnx.split(model)
    rows = batch_sharding(mesh, 2)
    local = ROWS // jax.process_count()
    lo = jax.process_index() * local
    host = {k: v[lo : lo + local] for k, v in global_batch().items()}
    batch = {
        k: jax.make_array_from_process_local_data(rows if v.ndim == 2 else batch_sharding(mesh, 1), v)
        for k, v in host.items()
    }

    def loss_fn(params, batch):
        m = nnx.merge(graphdef, params)
        hidden_BxTxD = m.hidden_states(batch["input_ids"])
        logps_B, _ = logprobs.sequence_logprobs_from_hidden(
            hidden_BxTxD, m.unembedding(), batch["targets"], batch["loss_mask"], chunk_size=16
        )
        ref_B = batch["ref_logps"]
        loss, _ = losses.dpo_loss(logps_B[0::2], logps_B[1::2], ref_B[0::2], ref_B[1::2], beta=0.1)
        return loss, logps_B

    with jax.set_mesh(mesh):
        (loss, logps_B), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    # Gradients are sharded over both processes; gathered, every process holds them whole.
    if jax.process_count() > 1:
        loss, grads, logps_B = multihost_utils.process_allgather((loss, grads, logps_B), tiled=True)
    flat = np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(grads)])
    sharded_over = max(len(x.sharding.device_set) for x in jax.tree.leaves(params))
    return {"loss": np.asarray(loss), "logps": np.asarray(logps_B), "grads": flat, "spread": sharded_over}


def train_config(assets, out_dir, steps: int = 3):
    """The tiny DPO run both the process pair and the single-process reference train (float32): `assets`
    has model_dir, train_path and eval_path; the reference cache goes beside `out_dir`."""
    from helpers import run_config

    return run_config(
        assets, out_dir, **{"train.max_steps": steps, "train.save_every": steps, "train.export": False}
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="model", help="comma-separated: model, train, fail")
    p.add_argument("--out", required=True, help="directory for the results")
    p.add_argument("--model-dir")
    p.add_argument("--train")
    p.add_argument("--eval")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--sigterm-step", type=int, default=0, help="SIGTERM process 1 (only) once it logged this step"
    )
    args = p.parse_args(argv)

    import jax

    # Before anything computes: the device count, then the cluster (the JDPO_* variables).
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    from jdpo.parallel import distributed

    info = distributed.maybe_initialize()
    again = distributed.maybe_initialize()  # idempotent: the same result, no second initialisation
    assert again is info, (again, info)
    pid, n = distributed.process_index(), distributed.process_count()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "info": str(info),
        "kind": info.kind,
        "process_index": pid,
        "process_count": n,
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "is_main": distributed.is_main_process(),
        "broadcast": int(distributed.broadcast_from_main(jax.numpy.int32(100 + pid))),
        "any_of_1": distributed.any_process(pid == 1),  # True on process 1 only: True everywhere
        "any_of_none": distributed.any_process(False),
    }
    distributed.sync("worker started")

    import numpy as np

    from jdpo.parallel.sharding import make_mesh

    report["seconds"] = {"start": round(time.perf_counter() - T0, 1)}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        if task == "model":
            res = model_task(make_mesh(data=1, fsdp=2, tensor=2))
            np.savez(out / f"model.p{pid}.npz", **res)
        elif task == "train":
            from jdpo.train import trainer as train

            assets = SimpleNamespace(model_dir=args.model_dir, train_path=args.train, eval_path=args.eval)
            cfg = train_config(assets, out / "train" / "run", steps=args.steps)

            def preempt(m):
                # A stop request that reaches one worker only: the loop must still stop both together.
                if pid == 1 and m["step"] == args.sigterm_step and "loss" in m:
                    os.kill(os.getpid(), signal.SIGTERM)

            # The mesh from the config: fsdp over all 4 devices of both processes.
            result = train.run(cfg, callbacks=[preempt])
            report["train"] = {
                "step": result.step,
                "stop_reason": result.stop_reason,
                "metrics": result.metrics,
            }
        elif task == "fail":  # process 1 fails; process 0 waits for it forever (the test must kill it)
            if pid == 1:
                raise RuntimeError("process 1 fails on purpose")
            distributed.sync("process 1 never gets here")
        else:
            raise SystemExit(f"unknown task {task!r}")
        distributed.sync(f"task {task} done")
        report["seconds"][task] = round(time.perf_counter() - t0, 1)
    (out / f"report.p{pid}.json").write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    # A worker is a fresh interpreter: no flags inherited from the test process may force 8 devices.
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        code = main()
    except BaseException:
        # Exit now: a normal exit would run jax.distributed's shutdown, which waits (minutes) for the
        # other process to shut down too, while the other may be waiting for this one in a collective.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)
