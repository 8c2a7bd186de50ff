"""What stops or saves a training run, each policy on its own: the step cadences, early stopping,
preemption (SIGTERM), and the non-finite-loss stop.

The loop in `jdpo.train.Trainer.fit` asks these; each keeps whatever state it needs in a JSON-able dict
that goes into the checkpoint's metadata, so that a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import warnings
from typing import Any

log = logging.getLogger(__name__)

OVERFIT_ACCURACY = 0.8  # eval preference accuracy above this is suspicious on real preference data


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the message names the step and the last good checkpoint."""


def due(every: int, step: int, total: int) -> bool:
    """An every-N-steps action (log, eval, checkpoint) is due at `step`: each N-th step, and the last."""
    return bool(every and step % every == 0) or step == total


class EarlyStopping:
    """Early stop on the eval preference accuracy (`train.early_stop_accuracy` reached, or no improvement
    in `train.early_stop_patience` evals), and a one-time warning when the accuracy looks like overfitting.
    """

    def __init__(self, train, loss_type: tuple[str, ...]):
        self.accuracy, self.patience = train.early_stop_accuracy, train.early_stop_patience
        self.preference_loss = set(loss_type) != {"sft"}  # SFT alone has no meaningful reward accuracy
        self.best, self.since_best, self.warned = -1.0, 0, False

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "since_best": self.since_best, "warned": self.warned}

    def restore(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", self.best))
        self.since_best = int(state.get("since_best", self.since_best))
        self.warned = bool(state.get("warned", self.warned))

    def observe(self, step: int, eval_metrics: dict[str, float]) -> bool:
        """Record one eval; True when the run should stop after this step. Step 0 (the policy is
        still the reference) only warns."""
        acc = eval_metrics.get("eval/rewards/accuracies", 0.0)
        if round(acc, 4) > OVERFIT_ACCURACY and not self.warned and self.preference_loss:
            self.warned = True
            warnings.warn(
                f"eval preference accuracy {acc:.2%} at step {step} is above {OVERFIT_ACCURACY:.0%}: "
                "on real preference data that usually means overfitting (or an easy / leaky eval split)",
                stacklevel=3,
            )
        if step == 0:
            return False
        if acc > self.best:
            self.best, self.since_best = acc, 0
        else:
            self.since_best += 1
        if self.accuracy and acc >= self.accuracy:
            log.info("early stop: eval accuracy %.3f >= %.3f at step %d", acc, self.accuracy, step)
            return True
        if self.patience and self.since_best >= self.patience:
            log.info("early stop: no eval accuracy improvement in %d evals", self.patience)
            return True
        return False


class Preemption:
    """SIGTERM (a preempted TPU VM, `run_tpu.sh stop`, a scheduler's time limit) as a request to
    checkpoint and return. A context manager: the handler is installed for the run's life (from the main
    thread only; elsewhere signals cannot be caught) and the previous one restored after."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        """Unanimous across processes (a collective: call it on every process at the same step): a
        pod's workers may get the signal at different steps."""
        from jdpo.distributed import any_process

        return any_process(self._event.is_set())


def check_finite(loss: float, state_finite: bool, step: int, checkpointer) -> None:
    """Raise NonFiniteLossError naming the step and the last good checkpoint when the step's loss is
    NaN / inf or it left non-finite parameters or optimizer state (checked before anything is saved,
    so every checkpoint on disk holds finite weights)."""
    if math.isfinite(loss) and state_finite:
        return
    checkpointer.wait()
    good = checkpointer.latest_step()
    where = f"checkpoint at step {good} in {checkpointer.directory}" if good is not None else "no checkpoint"
    what = (
        f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite parameters or optimizer state"
    )
    raise NonFiniteLossError(f"{what} at step {step}; stopping. Last good: {where}")
