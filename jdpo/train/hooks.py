"""The loop's standard hooks, in the order they run after each step (`jdpo.train.loop.Loop`).

guards (non-finite state, divergence) -> the train record (every `train.log_every`) -> eval with best
and early stop (every `train.eval_every`, and once before the first step) -> the reference update the
schedule names -> SIGTERM -> the checkpoint (every `train.save_every`, at a stop, at a new best).
The reference update comes before the checkpoint, so a checkpoint holds (or names) the reference the
next step uses.
"""

from __future__ import annotations

from typing import Any

from jdpo.report.flops import throughput_metrics, token_counts, total_peak_flops, train_flops
from jdpo.train.guards import check_finite, due
from jdpo.train.loop import Loop, StepEvent
from jdpo.train.step import STATE_FINITE


def standard_hooks(loop: Loop) -> None:
    t = loop.trainer.config.train
    loop.add_start_hook(lambda lp: run_eval(lp, 0))  # the "before" numbers (policy == reference)
    loop.add_hook(guard)
    loop.add_hook(Throughput(loop.trainer), every=t.log_every)
    loop.add_hook(lambda lp, ev: run_eval(lp, ev.step), every=t.eval_every)
    loop.add_hook(update_reference)
    loop.add_hook(preemption)
    loop.add_hook(checkpoint)


def guard(loop: Loop, ev: StepEvent) -> None:
    """Stop before anything is saved when the step left a non-finite or diverged state; then add the
    data's own metrics of the step (online sampling)."""
    tr, m = loop.trainer, ev.metrics
    if m:  # a step without pairs ran no update
        check_finite(float(m["loss"]), bool(m.pop(STATE_FINITE)), ev.step, tr.checkpoints)
        tr.divergence.check(ev.step, m, tr.checkpoints)
    m.update(tr.data.step_metrics(ev.train_time))


class Throughput:
    """The logged train record: the step's metrics, its epoch, and throughput over all processes."""

    def __init__(self, trainer):
        # Constant over the run: computed once (on CPU the peak is measured).
        self.hf_config = trainer.model_config.to_hf()
        self.peak = total_peak_flops(list(trainer.mesh.devices.flat))

    def __call__(self, loop: Loop, ev: StepEvent) -> None:
        tr = loop.trainer
        # Each process counts its own rows; summed, the counters are the global batch's.
        mc = tr.model_config
        counts = token_counts(ev.host, sliding_window=mc.sliding_window, sliding_layers=mc.sliding_layers)
        counts = counts.over_processes()
        tokens, keys, slots = counts.tokens, counts.attended_keys, counts.slots
        flops = train_flops(self.hf_config, tokens=tokens, attended_keys=keys,
                            reference_forward=tr.config.dpo.reference == "online",
                            lora_params=tr.lora_params())  # fmt: skip
        record: dict[str, Any] = {k: float(v) for k, v in ev.metrics.items() if k != "pairs"}
        record.update(tr.data.record(ev.step))
        record.update(throughput_metrics(step_time=ev.step_time, tokens=tokens, slots=slots, flops=flops,
                                         peak_flops=self.peak))  # fmt: skip
        loop.last = record
        loop.emit(ev.step, record)


def run_eval(loop: Loop, step: int) -> None:
    """Eval of the reference this step trained against; `train.keep_best` and early stopping observe it."""
    tr = loop.trainer
    ev = tr.evaluate()
    if not ev:
        return
    loop.last_eval = ev
    loop.emit(step, ev)
    if tr.best is not None:
        loop.new_best = tr.best.observe(step, ev)
    if tr.early_stopping.observe(step, ev):
        loop.request_stop("early_stop")


def update_reference(loop: Loop, ev: StepEvent) -> None:
    tr = loop.trainer
    kind = tr.reference_updates.after(ev.step, tr.config.train.rounds > 1 and tr.data.round_ended())
    if kind is not None:
        tr.update_reference(kind)


def preemption(loop: Loop, ev: StepEvent) -> None:
    if loop.preemption.requested():
        loop.request_stop("sigterm")


def checkpoint(loop: Loop, ev: StepEvent) -> None:
    best, loop.new_best = loop.new_best, None
    if (
        due(loop.trainer.config.train.save_every, ev.step, loop.trainer.data.total_steps)
        or loop.stop
        or best is not None
    ):
        loop.trainer.save(ev.step, metric=best)
