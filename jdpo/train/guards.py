"""What stops or saves a training run, each policy on its own: the step cadences, early stopping,
the best checkpoint (`train.keep_best`), preemption (SIGTERM), the non-finite-loss stop and the
divergence guard.

The loop in `jdpo.train.trainer.Trainer.fit` asks these; each keeps whatever state it needs in a JSON-able dict
that goes into the checkpoint's metadata, so that a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import statistics
import threading
import warnings
from typing import Any

from jdpo.config import ConfigError
from jdpo.errors import DivergenceError, NonFiniteLossError
from jdpo.parallel.distributed import any_process

log = logging.getLogger(__name__)

OVERFIT_ACCURACY = 0.8  # eval preference accuracy above this is suspicious on real preference data


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


class BestEval:
    """`train.keep_best` ('<eval metric>:<min|max>'): which eval so far was the best. The loop saves a
    checkpoint at each new best, with the value as its orbax metric, so that the checkpointer keeps it
    outside the newest-N rotation (`jdpo.train.checkpoint.Checkpointer(best=...)`); step 0 (the initial
    weights, which have no checkpoint) is not a candidate."""

    def __init__(self, spec: str):
        self.metric, _, direction = spec.rpartition(":")
        self.maximize = direction == "max"
        self.step: int | None = None
        self.value: float | None = None

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "maximize": self.maximize, "step": self.step, "value": self.value}

    def restore(self, state: dict[str, Any]) -> None:
        # A resume with another train.keep_best starts its own record (the old best is not comparable).
        if state.get("metric") == self.metric and state.get("maximize") == self.maximize:
            self.step, self.value = state.get("step"), state.get("value")

    def observe(self, step: int, eval_metrics: dict[str, float]) -> float | None:
        """This eval's value of the metric when it is a new best (the caller then saves), else None."""
        if self.metric not in eval_metrics:
            raise ConfigError(
                f"train.keep_best: the evals of this run have no {self.metric!r}; they have: "
                + ", ".join(sorted(eval_metrics))
            )
        value = float(eval_metrics[self.metric])
        if step == 0 or not math.isfinite(value):
            return None
        if self.value is None or (value > self.value if self.maximize else value < self.value):
            self.step, self.value = step, value
            return value
        return None


class StopRun(Exception):  # noqa: N818 (a control-flow signal, not an error of its own)
    """Raised by a part while it makes a step's batches when the run must end before that step (online:
    the reward failed, or SIGTERM arrived during its call): the loop saves the last completed step, stops
    with `reason`, then raises `error` (None: a plain stop)."""

    def __init__(self, reason: str, error: BaseException | None = None):
        super().__init__(reason)
        self.reason, self.error = reason, error


def sigterm_pending() -> bool:
    """SIGTERM has arrived during the current run (this process; a part's long call polls it)."""
    active = Preemption.active
    return active is not None and active._event.is_set()


class Preemption:
    """SIGTERM (a preempted TPU VM, `run_tpu.sh stop`, a scheduler's time limit) as a request to
    checkpoint and return. A context manager: the handler is installed for the run's life (from the main
    thread only; elsewhere signals cannot be caught) and the previous one restored after."""

    active: Preemption | None = None  # the one whose handler is installed (`sigterm_pending`)

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        Preemption.active = self
        return self

    def __exit__(self, *exc) -> None:
        if Preemption.active is self:
            Preemption.active = None
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        """Unanimous across processes (a collective: call it on every process at the same step): a
        pod's workers may get the signal at different steps."""

        return any_process(self._event.is_set())


def check_finite(loss: float, state_finite: bool, step: int, checkpointer) -> None:
    """Raise NonFiniteLossError naming the step and the last good checkpoint when the step's loss is
    NaN / inf or it left non-finite parameters or optimizer state (checked before anything is saved,
    so every checkpoint on disk holds finite weights)."""
    if math.isfinite(loss) and state_finite:
        return
    what = (
        f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite parameters or optimizer state"
    )
    raise NonFiniteLossError(f"{what} at step {step}; stopping. Last good: {_last_good(checkpointer)}")


def _last_good(checkpoints, past_bound=None) -> str:
    """The newest checkpoint (`RunCheckpoints`) a stopped run can go back to. `past_bound(meta)`: True
    for a checkpoint that must not be named good (the divergence guard's: its loss was already past the
    bound); the ones passed over are named too."""
    checkpoints.wait()
    passed = []
    for step in reversed(checkpoints.checkpointer.steps()):
        if past_bound is not None:
            try:
                bad = past_bound(checkpoints.checkpointer.meta(step))
            except Exception:  # an unreadable meta (orbax raises many kinds): not one to name good
                bad = True
            if bad:
                passed.append(step)
                continue
        where = f"checkpoint at step {step} in {checkpoints.directory}"
        break
    else:
        where = "no checkpoint"
    if passed:
        steps = ", ".join(str(s) for s in sorted(passed))
        where += f" (not steps {steps}: their loss was already past the bound, or their meta unreadable)"
    return where


class DivergenceGuard:
    """Stops a run that blows up while still finite (the lr = 1e6 kind, which otherwise finishes and
    exports weights in the millions): the loss above `train.divergence_factor` times its early, healthy
    level (its step-1 value, from step 2 on: a loss that climbs steadily drags its running median up with
    it), the grad norm above that factor times the larger of its running median (the last WINDOW steps)
    and its step-1 value, or a parameter's magnitude above `train.max_param_abs`. Checked before the
    step's state is saved, and a checkpoint whose loss was already past the bound (saved with the guard
    off or a larger factor) is never named the last good one. The history goes into the checkpoint: a
    resumed run decides the same."""

    WINDOW = 50  # steps in the running median
    MIN_HISTORY = 5  # steps seen before a grad-norm spike can count (the first steps of a run move fast)
    WATCHED = ("loss", "grad_norm")
    # The loss is on a fixed scale from the start (policy == reference: ln 2 for DPO), so its step-1
    # value is a bound; below this magnitude (a loss that starts at ~0) only the running median is.
    EARLY_FLOOR = 1e-3

    def __init__(self, train):
        self.factor, self.bound = train.divergence_factor, train.max_param_abs
        self.history: dict[str, list[float]] = {k: [] for k in self.WATCHED}
        self.first: dict[str, float] = {}

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "first": self.first}

    def restore(self, state: dict[str, Any]) -> None:
        self.history = {k: [float(v) for v in state.get("history", {}).get(k, [])] for k in self.WATCHED}
        self.first = {k: float(v) for k, v in state.get("first", {}).items()}

    def _scale(self, k: str) -> tuple[float, str] | None:
        """The level metric `k` is compared against, and what it is; None while there is none yet."""
        seen, first = self.history[k], abs(self.first.get(k, 0.0))
        if k == "loss" and first >= self.EARLY_FLOOR:
            return first, "its step-1 value, the run's early level"
        if len(seen) >= self.MIN_HISTORY:
            scale = max(abs(statistics.median(seen)), first)
            return scale, f"the larger of its median over the last {len(seen)} steps and its step-1 value"
        return None

    def _past_bound(self, meta: dict) -> bool:
        """A checkpoint's meta: its step's loss (the last in the history it saved) was past the bound."""
        saved = meta.get("divergence", {})
        losses, first = saved.get("history", {}).get("loss", []), abs(saved.get("first", {}).get("loss", 0))
        return bool(
            self.factor and losses and first >= self.EARLY_FLOOR and abs(losses[-1]) > self.factor * first
        )

    def check(self, step: int, m: dict[str, float], checkpoints) -> None:
        """Raise DivergenceError when step `step`'s metrics `m` show a blow-up; else record them."""
        biggest = float(m.get("param_abs_max", 0.0))
        if self.bound and biggest > self.bound:
            raise DivergenceError(
                f"a parameter reached magnitude {biggest:.4g} at step {step}, over train.max_param_abs="
                f"{self.bound:g}: the run diverged (learning rate too high?); stopping. Last good: "
                f"{_last_good(checkpoints, self._past_bound)}"
            )
        for k in self.WATCHED:
            value, scale = float(m[k]), self._scale(k) if self.factor else None
            if scale is not None and abs(value) > self.factor * scale[0]:
                raise DivergenceError(
                    f"{k} {value:.4g} at step {step} is over train.divergence_factor={self.factor:g} times "
                    f"{scale[0]:.4g} ({scale[1]}): the run diverged; stopping. Last good: "
                    f"{_last_good(checkpoints, self._past_bound)}"
                )
        for k in self.WATCHED:
            self.first.setdefault(k, float(m[k]))
            self.history[k] = (self.history[k] + [float(m[k])])[-self.WINDOW :]
