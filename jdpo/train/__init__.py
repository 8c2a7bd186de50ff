"""Training: the run's parts (data, reference, state, step, loop, hooks, checkpoints, export).

`jdpo.train.run(config)` is the one-call form of `jdpo.Trainer(config).fit()`; both are resolved on
first use, so importing a part (`jdpo.train.step`) does not load the trainer.
"""

import importlib

_LAZY = {
    "run": "jdpo.train.trainer",
    "Trainer": "jdpo.train.trainer",
    "RunResult": "jdpo.train.trainer",
    "DivergenceError": "jdpo.train.guards",
    "NonFiniteLossError": "jdpo.train.guards",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jdpo.train' has no attribute {name!r}")
