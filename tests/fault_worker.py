"""A training run for tests/test_run_guards.py to kill: `python fault_worker.py CONFIG.yaml WHEN`.

WHEN is `step:N` (SIGKILL right after step N's train metrics are logged, before its checkpoint is
written), `save:N` (SIGKILL right after step N's checkpoint has started: the arrays are off the device
and orbax is writing them in its background threads) or `none` (run to the end).
"""

from __future__ import annotations

import os
import signal
import sys

from jdpo import config
from jdpo.train import trainer as train
from jdpo.train.checkpoint import Checkpointer


def main(config_path: str, when: str) -> int:
    cfg = config.load_config(config_path)
    kind, _, n = when.partition(":")
    callbacks = []
    if kind == "step":
        callbacks.append(
            lambda m: m["step"] == int(n) and "loss" in m and os.kill(os.getpid(), signal.SIGKILL)
        )
    elif kind == "save":
        real = Checkpointer.save

        def save_then_die(self, step, *args, **kwargs):
            real(self, step, *args, **kwargs)
            if step == int(n):
                os.kill(os.getpid(), signal.SIGKILL)

        Checkpointer.save = save_then_die
    train.run(cfg, callbacks=callbacks)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
