"""Metric names and metric writers (JSONL, console, TensorBoard, Weights & Biases).

Names follow TRL's DPOTrainer so curves can be compared with runs made there; eval metrics carry an
``eval/`` prefix. One small interface, :class:`MetricsLogger`, fans a ``{name: value}`` dict out to
every enabled writer:

    logger = MetricsLogger(out_dir, total_steps=1000, resume_step=state_step or None)
    logger.log(step, {"loss": 0.69, "rewards/accuracies": 0.5, ...})
    logger.close()

Only process 0 writes anything on a multi-host run. This module never imports JAX (it asks JAX for
the process index only when the caller has already imported it) so that ``jdpo plot`` and the CLI
stay fast. FLOPs, peak FLOP/s and MFU are counted in :mod:`jdpo.report.flops`. The output directory may be
an object store (``gs://bucket/run``): the files are then uploaded whole at sync points (``flush``).
"""

from __future__ import annotations

import json
import numbers
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, TextIO

from jdpo.paths import as_path, copy_file, is_local

# Metric names

LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
GRAD_NORM = "grad_norm"
LEARNING_RATE = "learning_rate"
STEP = "step"
EPOCH = "epoch"
# Tokens the policy forward computes per second: non-pad row slots, so a shared prompt counts once
# (`jdpo.report.flops.token_counts`, which every throughput figure comes from).
TOKENS_PER_SEC = "tokens_per_sec"
MFU = "mfu"  # model FLOPs utilisation, a fraction in [0, 1]
PADDING_FRACTION = "padding_fraction"  # pad tokens / all token slots of the step's batches
STEP_TIME = "step_time"  # seconds of wall clock per optimizer step

EVAL_PREFIX = "eval/"


def eval_name(name: str) -> str:
    """The eval-split name of a metric: ``eval_name("loss") == "eval/loss"``."""
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def is_eval(name: str) -> bool:
    return name.startswith(EVAL_PREFIX)


def to_python(value: Any) -> Any:
    """A JSON-able Python scalar from a Python / NumPy / JAX scalar (0-d arrays included).

    Integers stay ``int`` (``step``, counts); everything numeric else becomes ``float``. Strings and
    ``None`` pass through. Raises ``TypeError`` on arrays with more than one element, which are a bug
    in the caller rather than a metric.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # NumPy / JAX arrays and scalars: both expose .item() once pulled to the host.
    import numpy as np

    arr = np.asarray(value)
    if arr.size != 1:
        raise TypeError(f"metric values must be scalars, got shape {arr.shape}")
    return to_python(arr.reshape(()).item())


def _is_main_process() -> bool:
    """True on process 0. Imports JAX only if the caller has already imported it (it is then free)."""
    jax = sys.modules.get("jax")
    return True if jax is None else jax.process_index() == 0


# JSONL

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``<dir>/metrics.jsonl``), in file order; `path`
    may be a gs:// (any :func:`jdpo.paths.as_path`) URL.

    A torn last line (the process died mid-write) is skipped rather than raised on; a malformed line
    anywhere else raises ``ValueError`` naming the file and line number.
    """
    path = as_path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {e}") from None
    return records


#: On an object store, the least number of seconds between two uploads of the metrics files (they are
#: uploaded whole; the writers' default `sync_seconds`); `MetricsLogger.flush` (called at every
#: checkpoint) and `close` upload at once.
REMOTE_SYNC_SECONDS = 60.0


class JsonlWriter:
    """One JSON object per ``write`` call, appended to ``<output_dir>/metrics.jsonl`` and flushed.

    ``resume_step=None`` starts a new file. ``resume_step=N`` keeps the records with ``step <= N``
    (and drops anything logged after the checkpoint the run resumes from, plus a torn last line),
    then appends, so a resumed run's file has the same records as an uninterrupted run's. Non-finite
    floats are written as ``NaN`` / ``Infinity`` (Python's json reads them; a diverged loss should
    stay visible rather than become ``null``).

    On an object store (gs://...), which cannot append, the file is held in memory and uploaded whole
    (one atomic object write, so a reader never sees a torn line) at most every ``sync_seconds``, on
    :meth:`flush` and on :meth:`close`; a crash loses the lines logged since the last upload, and the
    trainer flushes at every checkpoint, so the records up to the checkpoint a run resumes from are there.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        sync_seconds: float | None = None,
        clock=time.monotonic,
    ):
        self.path = as_path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = None
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get(STEP, 0) <= resume_step]
        self._file = None
        if not is_local(self.path):
            self._lines = [json.dumps(r) + "\n" for r in kept or ()]
            self._sync_seconds = REMOTE_SYNC_SECONDS if sync_seconds is None else sync_seconds
            self._clock, self._synced_at = clock, clock()
            self.flush()  # the kept history (or an empty file) right away, as a local run's file is
        elif kept is not None:
            # Rewrite through a temporary file so a crash here cannot lose the kept history.
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
            self._file = self.path.open("a")
        else:
            self._file = self.path.open("w")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {STEP: int(step), **{k: v for k, v in metrics.items() if k != STEP}}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            return
        self._lines.append(json.dumps(record) + "\n")
        if self._clock() - self._synced_at >= self._sync_seconds:
            self.flush()

    def flush(self) -> None:
        """Make every record written so far visible in the file (uploads it on an object store)."""
        if self._file is not None:
            self._file.flush()
            return
        self.path.write_text("".join(self._lines))
        self._synced_at = self._clock()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self.flush()


# Console


def si_number(x: float) -> str:
    """Compact number with an SI suffix: 1234 -> '1.23k', 5.6e6 -> '5.60M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.1f}"


def format_duration(seconds: float) -> str:
    """``3725.2 -> '1:02:05'``; days are folded into hours."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# What the console shows, in order; a field is left out when its metric is absent from the step.
_CONSOLE_FIELDS = (
    (LOSS, lambda v: f"loss {v:.4f}"),
    (REWARDS_ACCURACIES, lambda v: f"acc {v:.3f}"),
    (REWARDS_MARGINS, lambda v: f"margin {v:.3f}"),
    (
        "online/reward_mean",
        lambda v: f"reward {v:.3f}",
    ),  # dpo.online (`jdpo.train.online`): the samples' mean
    ("online/tied_fraction", lambda v: f"tied {v:.2f}"),
    (GRAD_NORM, lambda v: f"gnorm {v:.3f}"),
    (LEARNING_RATE, lambda v: f"lr {v:.2e}"),
    (TOKENS_PER_SEC, lambda v: f"{si_number(v)} tok/s"),
    (MFU, lambda v: f"mfu {100 * v:.1f}%"),
)


def _console_fields(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    values = ((metrics.get(prefix + name), fmt) for name, fmt in _CONSOLE_FIELDS)
    return [fmt(v) for v, fmt in values if isinstance(v, numbers.Real)]


def format_progress(
    step: int, total_steps: int | None, metrics: Mapping[str, Any], eta_s: float | None = None
) -> str:
    """One console line for a training step, e.g.

    ``step  120/1000  12% | loss 0.6512 | acc 0.625 | margin 0.123 | 1.23k tok/s | mfu 41.2% | eta 0:12:34``
    """
    if total_steps:
        parts = [f"step {step:>{len(str(total_steps))}}/{total_steps} {100.0 * step / total_steps:3.0f}%"]
    else:
        parts = [f"step {step}"]
    parts += _console_fields(metrics)
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def format_eval(step: int, metrics: Mapping[str, Any]) -> str:
    """One console line for the ``eval/`` metrics of a step: ``eval @ 100 | loss 0.6400 | acc 0.650``."""
    return " | ".join([f"eval @ {step}"] + _console_fields(metrics, EVAL_PREFIX))


class ConsoleWriter:
    """Shows training progress: a live ``tqdm`` bar when the stream is a terminal, otherwise one
    :func:`format_progress` line per logged training step (log files, CI). An eval is one
    :func:`format_eval` line either way, written above the bar when there is one.

    The ETA uses the wall clock between the first logged step and now, so data loading, eval and
    checkpoint time (real costs of the remaining steps) count and compilation (which lands before
    the first log) does not. The first line has no ETA: its only timing would include compilation.
    """

    def __init__(self, total_steps: int | None = None, *, stream: TextIO | None = None, clock=time.monotonic):
        self.total_steps = total_steps
        self.stream = stream
        self.clock = clock
        self._anchor: tuple[int, float] | None = None
        self._bar = None

    def eta(self, step: int) -> float | None:
        """Seconds left after ``step`` at the average pace since the first logged step (None before
        a second step was logged or without a total)."""
        if not self.total_steps:
            return None
        remaining = max(0, self.total_steps - step)
        now = self.clock()
        if self._anchor is None:
            self._anchor = (step, now)
        first_step, first_time = self._anchor
        if step > first_step:
            return remaining * (now - first_time) / (step - first_step)
        return None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        stream = self.stream or sys.stdout
        if stream.isatty():
            self._write_bar(stream, step, metrics)
            return
        if any(not is_eval(k) for k in metrics):
            print(format_progress(step, self.total_steps, metrics, self.eta(step)), file=stream)
        if any(is_eval(k) for k in metrics):
            print(format_eval(step, metrics), file=stream)
        stream.flush()

    def _write_bar(self, stream: TextIO, step: int, metrics: Mapping[str, Any]) -> None:
        from tqdm import tqdm  # imported only for a terminal: runs that log to files never pay for it

        if any(not is_eval(k) for k in metrics):
            if self._bar is None:
                # Started at the first logged step, with the rate averaged over every step since
                # (smoothing=0): the plain lines' ETA, compilation left out.
                self._bar = tqdm(
                    total=self.total_steps,
                    initial=step,
                    unit="step",
                    file=stream,
                    smoothing=0,
                    dynamic_ncols=True,
                )
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(" | ".join(_console_fields(metrics)))
        if any(is_eval(k) for k in metrics):
            tqdm.write(format_eval(step, metrics), file=stream)  # clears the bar, prints, redraws it

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# TensorBoard


class TensorBoardWriter:
    """Scalar event files under ``<output_dir>/tensorboard``, written by tensorboardX.

    View with ``tensorboard --logdir <output_dir>``. Tags are the metric names, so TensorBoard groups
    ``rewards/*``, ``logps/*`` and ``eval/*`` into sections. Non-numeric values are skipped. A resumed
    run (``resume_step=N``) starts its file with a session-start marker at step ``N + 1``, which tells
    TensorBoard to drop the points an interrupted attempt logged after the checkpoint. tensorboardX
    writes from a background thread and flushes every two minutes, on :meth:`flush` and on :meth:`close`.

    On an object store the events go to a local temporary file (tensorboardX writes gs:// only through
    google-cloud-storage, s3:// through boto3, and neither appends), which is uploaded whole, as the
    metrics file is (:class:`JsonlWriter`): at most every ``sync_seconds``, on :meth:`flush` and on
    :meth:`close`.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        sync_seconds: float | None = None,
        clock=time.monotonic,
    ):
        # Imported here: tensorboardX imports torch whenever it is installed (over a second), a cost
        # that `jdpo plot` and the other commands that never write events should not pay.
        from tensorboardX import SummaryWriter

        self.dir = as_path(output_dir) / "tensorboard"
        self.dir.mkdir(parents=True, exist_ok=True)
        # tensorboardX names a file by the second and the host and opens it with "wb", so a writer
        # started in the same second as the last one (a quick resume) would truncate its file. A
        # count of the files already there keeps the name new and sorts the new file after them.
        n = sum(1 for _ in self.dir.glob("events.out.tfevents.*"))
        self._staging = None if is_local(self.dir) else tempfile.TemporaryDirectory(prefix="jdpo-tb-")
        self._sync_seconds = REMOTE_SYNC_SECONDS if sync_seconds is None else sync_seconds
        self._clock, self._synced_at = clock, clock()
        self._writer = SummaryWriter(
            self._staging.name if self._staging else os.fspath(self.dir),
            purge_step=None if resume_step is None else resume_step + 1,
            filename_suffix=f".{n:03d}",
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        for tag, value in metrics.items():
            if tag != STEP and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(tag, float(value), step)
        if self._staging and self._clock() - self._synced_at >= self._sync_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the queued events to the file (and upload it on an object store)."""
        self._writer.flush()
        if self._staging:
            self._upload()

    def _upload(self) -> None:
        for name in os.listdir(self._staging.name):
            copy_file(os.path.join(self._staging.name, name), self.dir / name)
        self._synced_at = self._clock()

    def close(self) -> None:
        self._writer.close()  # flushes what is still queued
        if self._staging:
            self._upload()
            self._staging.cleanup()


# Weights & Biases (optional, imported only when asked for)


class WandbWriter:
    """Logs to Weights & Biases. Needs ``pip install wandb``; never imported unless enabled.

    The run id is kept in ``<output_dir>/wandb_run_id`` so a resumed run continues the same W&B run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "wandb logging was asked for but wandb is not installed: pip install wandb"
            ) from e
        id_file = as_path(output_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self._run = wandb.init(
            project=project or "jdpo",
            name=run_name,
            id=run_id,
            resume="allow",
            dir=os.fspath(as_path(output_dir)) if is_local(output_dir) else None,  # wandb's files are local
            config=dict(config) if config else None,
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log({k: v for k, v in metrics.items() if k != STEP}, step=step)

    def close(self) -> None:
        self._run.finish()


# The one interface the trainer uses


class MetricsLogger:
    """Fans metrics out to the enabled writers; a no-op on every process but process 0.

    Args:
      output_dir: run directory, local or an object-store URL (:func:`jdpo.paths.as_path`);
        ``metrics.jsonl`` and ``tensorboard/`` go here.
      total_steps: for the console's ``step/total`` and ETA.
      resume_step: the step of the checkpoint being resumed, or None for a fresh run (see
        :class:`JsonlWriter` for what it does to the history).
      jsonl, tensorboard, console, wandb: which writers to enable. W&B is off by default.
      wandb_project, wandb_run_name, run_config: passed to ``wandb.init``.
      is_main: override the ``jax.process_index() == 0`` check (tests, custom launchers).
      stream: console stream (default ``sys.stdout``); a terminal gets a live progress bar.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int | None = None,
        resume_step: int | None = None,
        jsonl: bool = True,
        tensorboard: bool = True,
        console: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        is_main: bool | None = None,
        stream: TextIO | None = None,
    ):
        self.output_dir = as_path(output_dir)
        self.is_main = _is_main_process() if is_main is None else is_main
        self.writers: list[Any] = []
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self.writers.append(JsonlWriter(output_dir, resume_step=resume_step))
        if tensorboard:
            self.writers.append(TensorBoardWriter(output_dir, resume_step=resume_step))
        if console:
            self.writers.append(ConsoleWriter(total_steps, stream=stream))
        if wandb:
            self.writers.append(
                WandbWriter(output_dir, project=wandb_project, run_name=wandb_run_name, config=run_config)
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record for ``step``. Values may be Python, NumPy or JAX scalars (JAX ones are
        pulled to the host here, so call this only at the logging interval to keep steps async)."""
        if not self.writers:
            return
        clean = {k: to_python(v) for k, v in metrics.items() if k != STEP}
        for writer in self.writers:
            writer.write(int(step), clean)

    def flush(self) -> None:
        """Make everything logged so far visible in the output directory (on an object store: upload
        metrics.jsonl and the events now rather than at the next sync). The trainer calls it at every
        checkpoint."""
        for writer in self.writers:
            if hasattr(writer, "flush"):
                writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
