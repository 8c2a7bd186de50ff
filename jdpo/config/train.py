"""The `train` section (steps, batch sizes, evaluation, checkpoints, guards) and the `logging` section,
with the train section's rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jdpo.config.fields import ConfigError, setting
from jdpo.losses.defaults import metric_names

if TYPE_CHECKING:
    from jdpo.config.schema import Config


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
        "(e.g. eval/loss:min; step 0 excluded; '': off). With a reference that moves (train.rounds > 1, "
        "dpo.ref_update) only eval/logps/chosen or eval/logps/rejected.",
    )
    divergence_factor: float = setting(
        100.0,
        "Stop, keeping the last good checkpoint, when the loss exceeds this factor times its step-1 value, "
        "or the grad norm this factor times the larger of its running median and its step-1 value (0: off).",
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
    push_to_hub: str = setting(
        "",
        "Upload final/ (and best/) to this Hugging Face Hub model repository, OWNER/NAME, after the export "
        "(token: HF_TOKEN or a login; '': no upload).",
    )
    hub_private: bool = setting(False, "Create the train.push_to_hub repository as private.")
    hub_revision: str = setting(
        "", "The branch final/ is uploaded to ('': main); best/ goes to '<hub_revision>-best' (or 'best')."
    )
    allow_base_change: bool = setting(
        False,
        "Resume although the weights at model.path differ from those the checkpoint trained from: the "
        "policy continues from the checkpoint, a reference that is the initial weights comes from the new ones.",
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
    if t.divergence_factor != 0 and t.divergence_factor <= 1:
        raise ConfigError(f"train.divergence_factor must be 0 (off) or > 1, got {t.divergence_factor}")
    if t.max_param_abs < 0:
        raise ConfigError(f"train.max_param_abs must be >= 0 (0: off), got {t.max_param_abs}")
    if t.max_steps < 0 or t.num_epochs <= 0:
        raise ConfigError("train.max_steps must be >= 0 and train.num_epochs > 0")
    check_hub(t)


def check_hub(t: TrainSection) -> None:
    """train.push_to_hub is OWNER/NAME and needs the export; its options need it."""
    if not t.push_to_hub:
        for name, value in (("hub_private", t.hub_private), ("hub_revision", t.hub_revision)):
            if value:
                raise ConfigError(f"train.{name}={value!r} is a setting of the upload: it needs "
                                  "train.push_to_hub")  # fmt: skip
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", t.push_to_hub):
        raise ConfigError(f"train.push_to_hub={t.push_to_hub!r} must be a Hub repository id, OWNER/NAME")
    if not t.export:
        raise ConfigError("train.push_to_hub uploads the export: it needs train.export true")
    if t.hub_revision and not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", t.hub_revision):
        raise ConfigError(f"train.hub_revision={t.hub_revision!r} is not a branch name")


@dataclass(frozen=True)
class LoggingSection:
    """Where metrics go besides metrics.jsonl."""

    console: bool = setting(True, "Progress line on the console (process 0 only).")
    tensorboard: bool = setting(True, "Write TensorBoard event files under <output_dir>/tensorboard.")
    wandb: bool = setting(False, "Log to Weights & Biases (must be installed and logged in).")
    wandb_project: str = setting("jdpo", "Weights & Biases project name.")


# Eval metrics of the policy alone, with no reference in them (ORPO's odds too): the ones `train.keep_best`
# may compare in a run whose reference moves.
REFERENCE_FREE_EVAL = (
    "eval/logps/chosen",
    "eval/logps/rejected",
    "eval/log_odds_ratio",
    "eval/log_odds_chosen",
)


def check_keep_best(cfg: Config) -> None:
    """train.keep_best names an eval metric this run's loss settings log (a typo costs no model load), and
    with a reference that moves, one of the policy alone."""
    t, d = cfg.train, cfg.dpo
    if not t.keep_best:
        return
    metric, _, direction = t.keep_best.rpartition(":")
    if not metric.startswith("eval/") or direction not in ("min", "max"):
        raise ConfigError(
            f"train.keep_best={t.keep_best!r} must be '<eval metric>:<min|max>', e.g. eval/loss:min or "
            "eval/rewards/accuracies:max"
        )
    names = [f"eval/{name}" for name in metric_names(d.loss_type)]
    if metric not in names:
        raise ConfigError(
            f"train.keep_best={t.keep_best!r}: the evals of dpo.loss_type {list(d.loss_type)} have no "
            f"{metric!r}; they have: {', '.join(sorted(names))}"
        )
    moving = d.ref_update != "none" or t.rounds > 1
    what = f"dpo.ref_update={d.ref_update}" if d.ref_update != "none" else f"train.rounds={t.rounds}"
    if moving and metric not in REFERENCE_FREE_EVAL:
        raise ConfigError(
            f"train.keep_best={t.keep_best!r} with {what}: the eval loss and rewards are measured against "
            "the reference, which this run moves (each round or update restarts them near their start), so "
            "evals on either side of a move do not compare and the best would stay before the first one; "
            "name a metric of the policy alone (eval/logps/chosen:max, the chosen completions' "
            "log-probability; eval/logps/rejected:min), or leave train.keep_best empty"
        )
