"""The `train` section (steps, batch sizes, evaluation, checkpoints, guards) and the `logging` section,
with the train section's rules."""

from __future__ import annotations

from dataclasses import dataclass

from jdpo.config.fields import ConfigError, setting


@dataclass(frozen=True)
class TrainSection:
    """Steps, batch sizes, evaluation, checkpoints."""

    output_dir: str = setting(
        "runs/jdpo",
        "Where checkpoints, metrics.jsonl, plots and the final export go: a local path or a gs:// URL.",
    )
    seed: int = setting(0, "Seed of data order and any randomness.")
    batch_rows: int = setting(8, "Rows (packed sequences) per micro-batch, over all hosts.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    max_steps: int = setting(0, "Optimizer steps; 0 means num_epochs passes over the train pairs.")
    num_epochs: float = setting(1.0, "Epochs when max_steps is 0.")
    eval_every: int = setting(0, "Evaluate on the held-out split every N steps (0: only at the end).")
    save_every: int = setting(0, "Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = setting(2, "How many recent checkpoints to keep.")
    log_every: int = setting(1, "Log metrics every N steps.")
    early_stop_patience: int = setting(0, "Stop after N evals without eval accuracy improvement (0: never).")
    early_stop_accuracy: float = setting(0.0, "Stop once eval accuracy reaches this (0: never).")
    export: bool = setting(True, "Export the final policy in Hugging Face format to <output_dir>/final.")
    compile_cache: str = setting(
        "",
        "Directory of XLA's persistent compilation cache, so a rerun or resume loads its compiled steps "
        "(default: <output_dir>/../.jdpo_xla_cache; none: off). JAX_COMPILATION_CACHE_DIR wins.",
    )
    keep_best: str = setting(
        "",
        "Keep and export to <output_dir>/best the checkpoint of the best eval, as '<eval metric>:<min|max>' "
        "(e.g. eval/loss:min; step 0 excluded; '': off).",
    )
    divergence_factor: float = setting(
        100.0,
        "Stop, keeping the last good checkpoint, when the loss or the grad norm exceeds this factor times "
        "the larger of its running median and its step-1 value (0: off).",
    )
    max_param_abs: float = setting(
        1e4, "Stop, keeping the last good checkpoint, when any parameter's magnitude exceeds this (0: off)."
    )
    rounds: int = setting(
        1,
        "Iterative DPO: passes over the train data, the policy becoming the reference after each but the "
        "last; > 1 needs train.max_steps 0 and train.num_epochs 1. Metrics carry the round.",
    )
    allow_config_change: bool = setting(
        False,
        "Resume although settings that change the optimisation (loss, lr, steps, data, model...) differ "
        "from the checkpoint's; every config a run was started with is kept (config.<step>.yaml).",
    )


def check_train(t: TrainSection) -> None:
    for name, value in [
        ("train.batch_rows", t.batch_rows),
        ("train.grad_accum", t.grad_accum),
        ("train.log_every", t.log_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
    ]:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.keep_best:
        metric, _, direction = t.keep_best.rpartition(":")
        if not metric.startswith("eval/") or direction not in ("min", "max"):
            raise ConfigError(
                f"train.keep_best={t.keep_best!r} must be '<eval metric>:<min|max>', e.g. eval/loss:min or "
                "eval/rewards/accuracies:max"
            )
    if t.divergence_factor != 0 and t.divergence_factor <= 1:
        raise ConfigError(f"train.divergence_factor must be 0 (off) or > 1, got {t.divergence_factor}")
    if t.max_param_abs < 0:
        raise ConfigError(f"train.max_param_abs must be >= 0 (0: off), got {t.max_param_abs}")
    if t.max_steps < 0 or t.num_epochs <= 0:
        raise ConfigError("train.max_steps must be >= 0 and train.num_epochs > 0")


@dataclass(frozen=True)
class LoggingSection:
    """Where metrics go besides metrics.jsonl."""

    console: bool = setting(True, "Progress line on the console (process 0 only).")
    tensorboard: bool = setting(True, "Write TensorBoard event files under <output_dir>/tensorboard.")
    wandb: bool = setting(False, "Log to Weights & Biases (must be installed and logged in).")
    wandb_project: str = setting("jdpo", "Weights & Biases project name.")
