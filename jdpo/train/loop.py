"""The training loop: take the next step's batches, run the jitted step, then the hooks in order.

Everything a step does besides the update is a hook with a cadence (`Loop.add_hook(fn, every=N)`,
after levanter's hooks): the guards, the train record, eval (with best and early stop), the reference
update, SIGTERM, the checkpoint. `jdpo.train.hooks.standard_hooks` attaches the run's hooks; a new
capability adds a hook, not a branch here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from etils import epath

from jdpo.errors import HubUploadError
from jdpo.report import metrics, phases
from jdpo.train import hub_upload
from jdpo.train.guards import Preemption, StopRun, due
from jdpo.train.model_card import ModelCard


@dataclasses.dataclass
class RunResult:
    """What `run` and `Trainer.fit` return."""

    step: int  # the last completed optimizer step
    metrics: dict[str, Any]  # the last logged train metrics
    eval_metrics: dict[str, Any]  # the last eval metrics (eval/ names), {} without an eval split
    # etils.epath paths (`jdpo.paths.as_path`): a local one compares equal to the pathlib.Path of the
    # same string; on an object store they are gs://... URLs.
    output_dir: epath.Path
    final_dir: epath.Path | None  # the Hugging Face export, None when not exported
    best_dir: epath.Path | None  # `train.keep_best`'s export (<output_dir>/best), None without one
    best_step: int | None  # the step best_dir holds
    metrics_path: epath.Path
    checkpoint_dir: epath.Path
    stop_reason: str  # completed | early_stop | sigterm | callback


@dataclasses.dataclass
class StepEvent:
    """What the hooks see of one step."""

    step: int
    metrics: dict[str, Any]  # the step's metrics on the host ({} for a step without pairs)
    host: list  # this host's micro-batches (`jdpo.data.batch.Batch`)
    step_time: float  # seconds, building the batch included (input-bound runs show it)
    train_time: float  # seconds of the update alone


@dataclasses.dataclass
class Hook:
    fn: Callable[[Loop, StepEvent], None]
    every: int | None  # None: every step; N > 0: every N steps and the last; 0: never


class Loop:
    """One `fit`: the hooks, the metrics logger, the callbacks and what the hooks decided."""

    def __init__(self, trainer, callbacks: Sequence[Callable[[dict], Any]], start: int):
        self.trainer, self.callbacks, self.start = trainer, callbacks, start
        self.hooks: list[Hook] = []
        self.start_hooks: list[Callable[[Loop], None]] = []  # once, before the first step of a new run
        self.stop: str | None = None  # completed | early_stop | sigterm | callback
        self.last: dict[str, Any] = {}  # the last train record
        self.last_eval: dict[str, Any] = {}
        self.new_best: float | None = None  # this step's keep_best value when its eval was a new best
        self.preemption: Preemption | None = None
        self.logger: metrics.MetricsLogger | None = None
        self.error: BaseException | None = None  # raised once the last completed step is saved (`StopRun`)

    def add_hook(self, fn: Callable[[Loop, StepEvent], None], *, every: int | None = None) -> None:
        self.hooks.append(Hook(fn, every))

    def add_start_hook(self, fn: Callable[[Loop], None]) -> None:
        self.start_hooks.append(fn)

    def request_stop(self, reason: str) -> None:
        if self.stop is None:
            self.stop = reason

    def emit(self, step: int, record: dict) -> None:
        """Log a record and hand it to the callbacks; one returning True stops the run after this step."""
        self.logger.log(step, record)
        for cb in self.callbacks:
            if cb({"step": step, **record}) is True:
                self.request_stop("callback")

    def run(self) -> int:
        """Steps until `total_steps` or a stop; returns the last completed step."""
        tr, step = self.trainer, self.start
        while step < tr.data.total_steps and self.stop is None:
            t0 = time.perf_counter()
            try:
                batch, host = tr.next_step_batches()
            except StopRun as e:  # the data ended the run before this step (online: the reward failed)
                self.request_stop(e.reason)
                self.error = e.error
                break
            t1 = time.perf_counter()
            m: dict[str, Any] = {}
            if batch is not None:  # None: an online step whose prompts all tied, no update
                tr.state, m = tr.steps.train_step(tr.state, batch)
                m = jax.device_get(m)
            now = time.perf_counter()
            step = tr.step = step + 1
            event = StepEvent(step, m, host, step_time=now - t0, train_time=now - t1)
            for hook in self.hooks:
                if hook.every is None or due(hook.every, step, tr.data.total_steps):
                    hook.fn(self, event)
        return step


def fit(
    trainer, callbacks: Sequence[Callable[[dict], Any]], attach_hooks: Callable[[Loop], None]
) -> RunResult:
    """Train to `total_steps` from the trainer's step (a restored checkpoint's, else the newest in the
    output directory) under the trainer's run lock (`jdpo.train.runlock`: taken when the trainer was
    built, taken again if it was closed or given up since), released when the run ends."""
    lock = trainer.run_lock
    lock.acquire()
    lock.in_use = True
    try:
        return _fit(trainer, callbacks, attach_hooks)
    finally:
        lock.in_use = False
        lock.release()


def _fit(tr, callbacks, attach_hooks) -> RunResult:
    c, t = tr.config, tr.config.train
    tr.output_dir.mkdir(parents=True, exist_ok=True)
    start = tr.step if tr.restored else tr.restore()
    if jax.process_index() == 0:
        tr.checkpoints.keep_config(c, start)
    newest = tr.checkpoints.latest_step()
    if newest is not None and newest > start:
        raise ValueError(
            f"the trainer is at step {start} but {tr.checkpoints.directory} has checkpoints up to step "
            f"{newest}: continuing would overwrite them; continue from the newest (Trainer.from_checkpoint on "
            "the output directory) or copy the run to a new output directory first"
        )
    loop = Loop(tr, callbacks, start)
    loop.logger = tr.logger = metrics.MetricsLogger(
        tr.output_dir, total_steps=tr.data.total_steps, resume_step=start or None, console=c.logging.console,
        tensorboard=c.logging.tensorboard, wandb=c.logging.wandb, wandb_project=c.logging.wandb_project,
        run_config=None,
    )  # fmt: skip
    attach_hooks(loop)
    if jax.process_index() == 0 and c.logging.console:
        print(tr.describe(start), flush=True)
    step = start
    try:
        with Preemption() as loop.preemption:
            with phases.timed("step-0 eval"):
                for fn in loop.start_hooks if start == 0 else ():
                    fn(loop)
            _log_phases(tr, "set-up", step=start)
            step = loop.run()
            with phases.timed("final checkpoint"):
                if step > start:
                    tr.save(step)  # the final state (a no-op when this step was just saved)
                tr.checkpoints.wait()
            kept = tr.checkpoints.latest_step()
    finally:
        tr.checkpoints.close()
        tr.logger = None
        loop.logger.close()
    if loop.error is not None:  # a part ended the run with an error (`StopRun`): raised now, step saved
        where = (
            f"checkpoint at step {kept} in {tr.checkpoints.directory}"
            if kept is not None
            else "no checkpoint"
        )
        loop.error.args = (f"{loop.error}. The run stopped before step {step + 1}; kept: {where}. Fix the "
                           "cause and run the same command again to continue",)  # fmt: skip
        raise loop.error
    reason = loop.stop or "completed"
    exporting = t.export and reason != "sigterm"
    with phases.timed("export"):
        final_dir = tr.export() if exporting else None
        best_dir = tr.export_best() if exporting and tr.best is not None else None
    _log_phases(tr, "wrap-up", step=step)
    result = RunResult(
        step=step,
        metrics=loop.last,
        eval_metrics=loop.last_eval,
        output_dir=tr.output_dir,
        final_dir=final_dir,
        best_dir=best_dir,
        best_step=None if best_dir is None else tr.best.step,
        metrics_path=tr.output_dir / metrics.METRICS_FILE,
        checkpoint_dir=tr.checkpoints.directory,
        stop_reason=reason,
    )
    if c.train.push_to_hub and final_dir is not None:  # after the export is on disk (`hub_upload`)
        try:
            card = ModelCard.of_run(c, tr.output_dir, step, tr.best)
            hub_upload.push(c, card, final_dir, best_dir, lora_run=tr.state.base is not None,
                            best_step=result.best_step)  # fmt: skip
        except HubUploadError as e:
            e.result = result
            raise
    return result


def _log_phases(tr, what: str, *, step: int) -> None:
    """The phases timed since the last call (`jdpo.report.phases`): a console line and a line of
    `<output_dir>/phases.jsonl`, on process 0."""
    values = phases.take()
    if not values or jax.process_index() != 0:
        return
    if tr.config.logging.console:
        print(f"jdpo: {what}: {phases.line(values)}", flush=True)
    phases.append(tr.output_dir, phases.record(what, step, values))
