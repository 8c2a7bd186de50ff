"""Every setting of a jdpo run, as typed frozen dataclasses.

A run's config is built from three layers, later ones winning: the dataclass defaults, a YAML preset
(`experiments/*.yaml`, nested by section), and command-line overrides `--section.field value`.
Every field has a `help` text (shown by `jdpo train --help`). Unknown sections or fields, and values
of the wrong type, are errors that name the field and where it came from: a long run must never
start on a typo that was silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jdpo.errors import UserError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (tuples and other immutables only as defaults)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelSection:
    """The policy model: a Hugging Face checkpoint directory and how to run it."""

    path: str = _f("", "Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files).")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "Compute dtype; 'auto' is bfloat16 on GPU/TPU and float32 on CPU."
    )
    param_dtype: Literal["float32", "bfloat16"] = _f(
        "float32", "Dtype the parameters (and so the optimizer's update) are stored in."
    )
    remat: Literal["none", "full", "dots_saveable"] = _f(
        "none",
        "Rematerialisation per layer: none, full (recompute all), dots_saveable (keep matmul outputs).",
    )
    scan_layers: bool = _f(
        False, "Scan over the layer stack (one compiled layer; fast compiles of deep models)."
    )
    attention: Literal["auto", "blocked", "splash", "pallas_gpu", "xla"] = _f(
        "auto",
        "Attention kernel: auto (splash on TPU, pallas_gpu on NVIDIA GPUs unless the model soft-caps or "
        "has a sliding window, blocked elsewhere; the run log says which), blocked (segment-aware "
        "block-sparse, plain JAX, any device), splash (TPU Splash attention, Pallas), pallas_gpu (Pallas "
        "Triton flash attention with segment ids, NVIDIA GPUs), xla (dense masked, any device).",
    )
    attention_block: int = _f(
        0,
        "Positions per tile of the attention kernel; 0: the kernel's default (blocked 64, the CPU "
        "optimum; splash 512, a multiple of 128; pallas_gpu 128, a power of two).",
    )


@dataclass(frozen=True)
class DataSection:
    """Preference data sources and how they become fixed-shape batches."""

    train: tuple[str, ...] = _f(
        (), "Train sources: files, save_to_disk dirs or hub names; 'src:5000' or 'src:0.25' to sub-sample."
    )
    eval: tuple[str, ...] = _f((), "Held-out sources; empty means carve eval_fraction out of train.")
    eval_fraction: float = _f(0.0, "Fraction of train pairs held out for eval when `eval` is empty.")
    format: str = _f(
        "auto", "Record format: auto, standard, implicit_prompt, conversational, hh-rlhf, shp, oasst1."
    )
    max_length: int = _f(1024, "Max tokens of prompt + one completion; longer pairs are truncated.")
    max_prompt_length: int = _f(512, "Max prompt tokens; longer prompts keep their end.")
    row_length: int = _f(0, "Tokens per packed row (0: max_length * 2, room for a chosen+rejected pair).")
    packing: bool = _f(True, "Pack several pairs per row; false puts one pair per row (length buckets).")
    shared_prompt: Literal["auto", "true", "false"] = _f(
        "auto",
        "Lay a pair's prompt out once with chosen and rejected as two branches after it (fewer tokens, "
        "same log-probs): auto (on when the attention kernel runs it: blocked or xla, and the model has "
        "no sliding window), true, false.",
    )
    skip_bad_rows: bool = _f(False, "Skip malformed rows (count and print them) instead of stopping.")


def _loss_default(name: str) -> Any:
    """The default of a `jdpo.dpo_loss` option: the loss library's, the one source of defaults."""
    from jdpo.losses.defaults import DEFAULTS  # no jax: `jdpo --help` stays light

    return DEFAULTS[name]


# DPOSection fields that are `dpo_loss` options of the same name (see `DPOSection.loss_kwargs`).
LOSS_OPTIONS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "simpo_gamma",
    "f_alpha",
    "discopop_tau",
    "orpo_include_nll",
)
# The options of `jdpo.kto_loss` besides beta (the unpaired losses: dpo.loss_type kto / bco /
# apo_zero_unpaired).
UNPAIRED_OPTIONS = ("desirable_weight", "undesirable_weight")


@dataclass(frozen=True)
class DPOSection:
    """The preference loss and the reference model. The loss fields are `jdpo.dpo_loss`'s options,
    with its defaults."""

    loss_type: tuple[str, ...] = _f(
        ("sigmoid",),
        "Loss type(s); several are combined with loss_weights. kto, bco, apo_zero_unpaired: unpaired "
        "feedback (records prompt/completion/label; pairs are split into a desirable and an undesirable "
        "record), one type alone.",
    )
    loss_weights: tuple[float, ...] = _f((), "Weights of the loss types (default: 1 each).")
    beta: float = _f(_loss_default("beta"), "Inverse temperature of the implicit reward (DPO beta).")
    label_smoothing: float = _f(
        _loss_default("label_smoothing"),
        "Label smoothing eps of cDPO / rDPO / EXO / AOT / SimPO / f-DPO: assumed fraction of flipped labels.",
    )
    simpo_gamma: float = _f(_loss_default("simpo_gamma"), "SimPO target reward margin gamma.")
    f_alpha: float = _f(_loss_default("f_alpha"), "Alpha of the alpha-divergence (f-DPO) loss.")
    discopop_tau: float = _f(_loss_default("discopop_tau"), "Temperature tau of the DiscoPOP loss.")
    orpo_include_nll: bool = _f(
        _loss_default("orpo_include_nll"), "ORPO: include the NLL of the chosen completion."
    )
    desirable_weight: float = _f(
        _loss_default("desirable_weight"), "Weight of the desirable examples (kto, bco, apo_zero_unpaired)."
    )
    undesirable_weight: float = _f(
        _loss_default("undesirable_weight"),
        "Weight of the undesirable examples (kto, bco, apo_zero_unpaired).",
    )
    wpo: bool = _f(
        False,
        "WPO (Zhou+ 2024): weight each pair's loss by the policy's own length-normalised probability of "
        "its completions (open-instruct's wpo), computed in the step without gradient.",
    )
    reference: Literal["cached", "online", "none"] = _f(
        "cached",
        "Reference log-probs. cached: one pass of the initial weights, stored on disk; "
        "online: a frozen copy in memory; none: reference-free losses.",
    )
    reference_path: str = _f("", "Reference checkpoint if not the initial policy (default: model.path).")
    cache_dir: str = _f(
        "", "Directory of reference log-prob caches (default: <output_dir>/../.jdpo_refcache)."
    )
    ref_update: Literal["none", "hard", "soft"] = _f(
        "none",
        "Move the reference toward the policy every ref_update_every steps (TR-DPO, Gorbatovski+ 2024). "
        "hard: ref <- policy; soft: ref <- alpha * policy + (1 - alpha) * ref, alpha = ref_update_alpha "
        "(needs reference online). With reference cached a hard update recomputes the cache from the "
        "current weights (a new cache key). LoRA: the update applies to the adapters.",
    )
    ref_update_every: int = _f(512, "Steps between reference updates (dpo.ref_update hard / soft).")
    ref_update_alpha: float = _f(
        0.6, "TR-DPO's alpha of a soft reference update, in (0, 1] (1 is a hard update)."
    )
    beta_schedule: Literal["constant", "adaptive"] = _f(
        "constant",
        "Constant: beta stays dpo.beta. adaptive: a proportional controller (Ziegler+ 2019, PPO's KL "
        "coefficient) after every step: e = clip(KL / target_kl - 1, -0.2, 0.2), beta <- beta * (1 + "
        "beta_gain * e), starting at dpo.beta; KL is the step's sequence-level estimate (logged as "
        "ref_kl): the mean over its completions of log p_policy - log p_ref, a KL estimate when the "
        "completions are sampled from the policy (on offline pairs it is the data's mean log-ratio, "
        "often negative once DPO lowers both completions, which lowers beta). Logged as beta.",
    )
    target_kl: float = _f(0.0, "The adaptive beta schedule's target sequence-level KL (> 0; nats).")
    beta_gain: float = _f(0.1, "K_beta of the adaptive beta schedule (Ziegler+ 2019 use 0.1), per step.")
    online: bool = _f(
        False,
        "Online DPO (`jdpo.train.online`, the online section): every step samples completions of data.train's "
        "prompts from the current policy, scores them with online.reward and trains on each prompt's "
        "best-vs-worst pair. Needs dpo.reference online (or none for a reference-free loss).",
    )

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `jdpo.dpo_loss` these settings mean (everything but the log-probs,
        lengths, weights, reduction and bco_delta, which the step takes from the train state)."""
        kw = {name: getattr(self, name) for name in LOSS_OPTIONS}
        kw["loss_weights"] = kw["loss_weights"] or None
        return kw

    @property
    def unpaired(self) -> bool:
        """The loss is one of the unpaired losses (`jdpo.kto_loss`): the data are rated examples."""
        from jdpo.losses.defaults import UNPAIRED_LOSS_TYPES

        return any(t in UNPAIRED_LOSS_TYPES for t in self.loss_type)

    @property
    def running_reward_mean(self) -> bool:
        """The loss shifts its rewards by BCO's running reward mean, kept in the train state."""
        return any(t in ("bco", "bco_pair") for t in self.loss_type)

    def unpaired_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `jdpo.kto_loss` these settings mean (but the inputs, kl / delta,
        weights and reduction)."""
        return {"loss_type": self.loss_type[0], "beta": self.beta,
                **{name: getattr(self, name) for name in UNPAIRED_OPTIONS}}  # fmt: skip


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then cosine decay to 0, and global-norm clipping."""

    learning_rate: float = _f(5e-6, "Peak learning rate.")
    warmup_ratio: float = _f(0.1, "Fraction of the steps spent in linear warmup from 0.")
    b1: float = _f(0.9, "AdamW beta1.")
    b2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm (0 disables).")


@dataclass(frozen=True)
class TrainSection:
    """Steps, batch sizes, evaluation, checkpoints."""

    output_dir: str = _f(
        "runs/jdpo",
        "Where checkpoints, metrics.jsonl, plots and the final export go: a local path or a gs:// URL.",
    )
    seed: int = _f(0, "Seed of data order and any randomness.")
    batch_rows: int = _f(8, "Rows (packed sequences) per micro-batch, over all hosts.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    max_steps: int = _f(0, "Optimizer steps; 0 means num_epochs passes over the train pairs.")
    num_epochs: float = _f(1.0, "Epochs when max_steps is 0.")
    eval_every: int = _f(0, "Evaluate on the held-out split every N steps (0: only at the end).")
    save_every: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "How many recent checkpoints to keep.")
    log_every: int = _f(1, "Log metrics every N steps.")
    early_stop_patience: int = _f(0, "Stop after N evals without eval accuracy improvement (0: never).")
    early_stop_accuracy: float = _f(0.0, "Stop once eval accuracy reaches this (0: never).")
    export: bool = _f(True, "Export the final policy in Hugging Face format to <output_dir>/final.")
    compile_cache: str = _f(
        "",
        "Directory of XLA's persistent compilation cache: a rerun or resume loads the compiled steps "
        "instead of compiling them (default: <output_dir>/../.jdpo_xla_cache; none: off). One per "
        "process: JAX_COMPILATION_CACHE_DIR or an earlier run in the same process takes precedence.",
    )
    keep_best: str = _f(
        "",
        "Keep the checkpoint of the best eval ('<eval metric>:<min|max>', e.g. eval/loss:min or "
        "eval/rewards/accuracies:max; step 0 excluded) outside the keep_checkpoints rotation and export it "
        "to <output_dir>/best ('': off). With train.rounds > 1 or dpo.ref_update (a reference that moves) "
        "only a metric of the policy alone, eval/logps/chosen or eval/logps/rejected.",
    )
    divergence_factor: float = _f(
        100.0,
        "Stop, keeping the last good checkpoint, when the loss exceeds this factor times its step-1 value, "
        "or the grad norm this factor times the larger of its running median and its step-1 value (0: off).",
    )
    max_param_abs: float = _f(
        1e4, "Stop, keeping the last good checkpoint, when any parameter's magnitude exceeds this (0: off)."
    )
    rounds: int = _f(
        1,
        "Iterative DPO: passes over the train data, the policy becoming the reference (a hard update, "
        "dpo.ref_update's mechanism) after each but the last. A step never mixes two rounds' data (the "
        "last step of a round fills its missing micro-batches with empty ones). > 1 needs "
        "train.max_steps 0 and train.num_epochs 1; metrics carry the round (1-based) as round.",
    )
    allow_config_change: bool = _f(
        False,
        "Resume although settings that change the optimisation (loss, lr, steps, data, model...) differ "
        "from the checkpoint's; every config a run was started with is kept (config.<step>.yaml).",
    )
    allow_base_change: bool = _f(
        False,
        "Resume although the weights at model.path differ from those the checkpoint trained from (its "
        "meta records their fingerprint): the policy continues from the checkpoint and a reference that "
        "is the initial weights is taken from the new ones.",
    )


# The projections a LoRA adapter may target, by their Hugging Face module names (every family has them).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASection:
    """Parameter-efficient training: low-rank adapters on the frozen base (`jdpo.models.lora`)."""

    rank: int = _f(0, "LoRA rank r; 0 trains every weight (full fine-tuning).")
    alpha: float = _f(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank (as PEFT).")
    dropout: float = _f(
        0.0,
        "LoRA dropout (PEFT's lora_dropout): the probability of zeroing each input of an adapter (not of "
        "the base path) in the policy's training forward; the reference, eval and generation use none.",
    )
    targets: tuple[str, ...] = _f(
        LORA_TARGETS,
        "Hugging Face module names that get adapters (default: all attention and MLP projections).",
    )
    quantize: Literal["none", "int8", "nf4"] = _f(
        "none",
        "QLoRA base: the frozen projection kernels stored quantised and dequantised inside the matmul. "
        "int8: int8 with a float32 scale per output channel; nf4: QLoRA's 4-bit NormalFloat, blocks of 64 "
        "weights along the input axis with a float32 absmax each, two codes per byte (4.5 bits per "
        "weight). Embeddings, norms and lm_head stay in param_dtype.",
    )
    init_adapter: str = _f(
        "",
        "PEFT adapter directory to start from (e.g. an SFT adapter): the initial policy and, with it, the "
        "reference.",
    )


@dataclass(frozen=True)
class OnlineSection:
    """Online DPO (dpo.online true): sampling, scoring and pairing, every step (`jdpo.train.online`)."""

    reward: str = _f(
        "",
        "The reward: 'module:function' (or 'path/to/file.py:function'), called as fn(prompts, completions) "
        "with two lists of strings, returning one finite float per completion. Checked on a probe before "
        "the model loads.",
    )
    samples_per_prompt: int = _f(4, "Completions sampled per prompt (>= 2); the pair is best vs worst.")
    prompts_per_step: int = _f(8, "Prompts sampled per optimizer step (the step's pairs at most).")
    temperature: float = _f(1.0, "Sampling temperature (> 0: equal greedy samples would always tie).")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this mass (1: off).")
    max_new_tokens: int = _f(64, "Tokens sampled per completion at most (the stop token included).")
    reward_timeout: float = _f(
        600.0,
        "Seconds one call of the reward may take (0: no bound). The reward runs in a thread of its own: "
        "past this, or when it raises (SystemExit included) or scores badly, the run checkpoints its last "
        "completed step and stops with an error naming it; SIGTERM during a call checkpoints and stops "
        "as a preemption.",
    )


@dataclass(frozen=True)
class MeshSection:
    """Device mesh axes; their product must equal the number of devices (-1: all remaining)."""

    data: int = _f(1, "Data-parallel axis (replicated parameters).")
    fsdp: int = _f(-1, "Fully sharded data-parallel axis (parameters and optimizer state sharded).")
    tensor: int = _f(1, "Tensor-parallel axis (heads / mlp sharded); use when per-device batch is small.")


@dataclass(frozen=True)
class LoggingSection:
    """Where metrics go besides metrics.jsonl."""

    console: bool = _f(True, "Progress line on the console (process 0 only).")
    tensorboard: bool = _f(True, "Write TensorBoard event files under <output_dir>/tensorboard.")
    wandb: bool = _f(False, "Log to Weights & Biases (must be installed and logged in).")
    wandb_project: str = _f("jdpo", "Weights & Biases project name.")


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoRASection = field(default_factory=LoRASection)
    online: OnlineSection = field(default_factory=OnlineSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


class ConfigError(UserError, ValueError):
    """A config value that is unknown, mistyped or inconsistent; the message names the field."""


def sections() -> dict[str, type]:
    """Section name -> section dataclass, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def field_help() -> list[tuple[str, str, Any, str]]:
    """(dotted name, type name, default, help) for every field: the source of `jdpo train --help`."""
    rows = []
    for sname, scls in sections().items():
        hints = typing.get_type_hints(scls)
        for f in dataclasses.fields(scls):
            rows.append((f"{sname}.{f.name}", _type_name(hints[f.name]), f.default, f.metadata["help"]))
    return rows


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if typing.get_origin(tp) is tuple:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    return tp.__name__


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML's true / false
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            # Command line: comma-separated; an empty string is the empty list.
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan passes every `<` / `>` check below and poisons a run
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} at {where}")  # a bug in this module


def _unknown(name: str, known: list[str], where: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown field {name!r}{hint}")


# Fields older jdpo versions wrote into every config.yaml, now gone: the value they held when they are
# still read (so a run's own config.yaml keeps loading), and why they went.
REMOVED_FIELDS = {
    "dpo.bco_delta": (0.0, "bco_pair's reward shift is now BCO's running reward mean, in the train state"),
}


def attention_block_problem(kernel: str, block: int) -> str | None:
    """Why `model.attention_block = block` (> 0) does not suit the attention kernel `kernel` (a resolved
    `model.attention`), or None when it does. Here, not in jdpo.models, so validating needs no JAX."""
    if kernel == "splash" and block % 128:
        return f"model.attention_block={block} with splash: TPU tiles are multiples of 128"
    if kernel == "pallas_gpu" and block & (block - 1):
        return f"model.attention_block={block} with pallas_gpu: Triton tiles are powers of two"
    return None


# Values older jdpo versions accepted, now gone, and what to use instead.
REMOVED_VALUES = {
    ("model.attention", "cudnn"): (
        "it handed cuDNN a dense [B, 1, T, T] mask; pallas_gpu is the GPU kernel that reads the segment "
        "ids, and model.attention=auto picks it on NVIDIA GPUs"
    ),
}


def _apply(cfg: Config, section: str, name: str, value: Any, where: str) -> Config:
    secs = sections()
    if section not in secs:
        raise _unknown(section, list(secs), where)
    if f"{section}.{name}" in REMOVED_FIELDS:
        default, why = REMOVED_FIELDS[f"{section}.{name}"]
        if value != default:
            raise ConfigError(f"{where}: {section}.{name} is no longer a setting ({why}); remove it")
        return cfg
    if isinstance(value, str) and (f"{section}.{name}", value) in REMOVED_VALUES:
        why = REMOVED_VALUES[f"{section}.{name}", value]
        raise ConfigError(f"{where}: {section}.{name}={value} is no longer a choice ({why})")
    scls = secs[section]
    hints = typing.get_type_hints(scls)
    if name not in hints:
        raise _unknown(f"{section}.{name}", [f"{section}.{k}" for k in hints], where)
    new_value = _coerce(value, hints[name], f"{where}: {section}.{name}")
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: new_value})}
    )


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`['--dpo.beta', '0.2', '--train.seed=3']` -> [('dpo.beta', '0.2'), ('train.seed', '3')]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.field VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} needs a value")
            i += 1
            value = args[i]
        out.append((key, value))
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | list[tuple[str, str]] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides`; validated.

    overrides: either raw arguments (`['--dpo.beta', '0.2']`) or (dotted name, value) pairs.
    """
    import yaml

    cfg = Config()
    if path is not None:
        from jdpo.paths import as_path

        path = as_path(path)  # a local file or a URL (a run's config.yaml on gs://)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of fields")
            for name, value in values.items():
                cfg = _apply(cfg, section, name, value, str(path))
    pairs = list(overrides)
    if pairs and isinstance(pairs[0], str):
        pairs = parse_overrides(pairs)  # type: ignore[arg-type]
    for key, value in pairs:
        section, _, name = key.partition(".")
        cfg = _apply(cfg, section, name, value, "command line")
    validate(cfg)
    return cfg


def replace(cfg: Config, **dotted: Any) -> Config:
    """`replace(cfg, **{"train.max_steps": 3})`: typed updates for Python callers; validated."""
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        cfg = _apply(cfg, section, name, value, "replace()")
    validate(cfg)
    return cfg


def _check_unpaired(cfg: Config) -> None:
    d, t = cfg.dpo, cfg.train
    if t.early_stop_patience or t.early_stop_accuracy:
        raise ConfigError(
            f"train.early_stop_patience / early_stop_accuracy watch the eval preference accuracy, which the "
            f"rated examples of dpo.loss_type {d.loss_type[0]} do not have: set both to 0"
        )
    if len(d.loss_type) > 1 or d.loss_weights:
        raise ConfigError(
            f"dpo.loss_type {list(d.loss_type)}: the unpaired losses (kto, bco, apo_zero_unpaired) train on "
            "rated examples, not pairs, and cannot be combined with other loss types or loss_weights"
        )
    if d.reference == "none":
        raise ConfigError(f"dpo.loss_type {d.loss_type[0]} needs a reference: dpo.reference cached or online")
    if d.wpo:
        raise ConfigError("dpo.wpo weights pairs; it does not apply to the unpaired loss "
                          f"{d.loss_type[0]}: set dpo.wpo false")  # fmt: skip


def validate(cfg: Config) -> None:
    """Cross-field checks that would otherwise fail late in a run."""
    d, o, t = cfg.dpo, cfg.optim, cfg.train
    # The loss options are checked by the loss library itself (one set of rules), named as config fields.
    from jdpo.losses.pairwise import check_options
    from jdpo.losses.unpaired import check_unpaired_options

    try:
        if d.unpaired:
            _check_unpaired(cfg)
            check_unpaired_options(**d.unpaired_kwargs(), prefix="dpo.")
        else:
            check_options(**d.loss_kwargs(), ref_missing=d.reference == "none", prefix="dpo.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, value, lo, hi in [
        ("optim.warmup_ratio", o.warmup_ratio, 0.0, 1.0),
        ("data.eval_fraction", cfg.data.eval_fraction, 0.0, 0.99),
        ("optim.b1", o.b1, 0.0, 1.0),
        ("optim.b2", o.b2, 0.0, 1.0),
    ]:
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value} is outside [{lo}, {hi}]")
    for name, value in [("optim.learning_rate", o.learning_rate)]:
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    for name, value in [
        ("train.batch_rows", t.batch_rows),
        ("train.grad_accum", t.grad_accum),
        ("train.log_every", t.log_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
    ]:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.keep_best:
        _validate_keep_best(t.keep_best, d.loss_type)
    if t.divergence_factor != 0 and t.divergence_factor <= 1:
        raise ConfigError(f"train.divergence_factor must be 0 (off) or > 1, got {t.divergence_factor}")
    if t.max_param_abs < 0:
        raise ConfigError(f"train.max_param_abs must be >= 0 (0: off), got {t.max_param_abs}")
    if t.max_steps < 0 or t.num_epochs <= 0:
        raise ConfigError("train.max_steps must be >= 0 and train.num_epochs > 0")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be < data.max_length "
            f"({cfg.data.max_length}) to leave room for the completion"
        )
    block, kernel = cfg.model.attention_block, cfg.model.attention
    if block < 0:
        raise ConfigError(f"model.attention_block must be >= 0 (0: the kernel's default), got {block}")
    if block and kernel != "auto":  # auto: checked once the kernel is known (`Transformer`)
        if why := attention_block_problem(kernel, block):
            raise ConfigError(why)
    for name in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1 (all remaining devices), got {v}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1")
    _validate_lora(cfg)
    _validate_reference_updates(cfg)
    _validate_online(cfg)


def _validate_keep_best(spec: str, loss_type: tuple[str, ...]) -> None:
    """train.keep_best names an eval metric this run's loss settings log (a typo costs no model load)."""
    from jdpo.losses.defaults import metric_names

    metric, _, direction = spec.rpartition(":")
    if not metric.startswith("eval/") or direction not in ("min", "max"):
        raise ConfigError(
            f"train.keep_best={spec!r} must be '<eval metric>:<min|max>', e.g. eval/loss:min or "
            "eval/rewards/accuracies:max"
        )
    names = [f"eval/{name}" for name in metric_names(loss_type)]
    if metric not in names:
        raise ConfigError(
            f"train.keep_best={spec!r}: the evals of dpo.loss_type {list(loss_type)} have no {metric!r}; "
            f"they have: {', '.join(sorted(names))}"
        )


# Eval metrics of the policy alone, with no reference in them (ORPO's odds too): the ones `train.keep_best`
# may compare in a run whose reference moves.
REFERENCE_FREE_EVAL = (
    "eval/logps/chosen", "eval/logps/rejected", "eval/log_odds_ratio", "eval/log_odds_chosen",
)  # fmt: skip


def _validate_reference_updates(cfg: Config) -> None:
    """dpo.ref_update / train.rounds (a reference that moves) and dpo.beta_schedule."""
    d, t = cfg.dpo, cfg.train
    if t.rounds < 1:
        raise ConfigError(f"train.rounds must be >= 1, got {t.rounds}")
    if t.rounds > 1 and (t.max_steps or t.num_epochs != 1.0):
        raise ConfigError(
            f"train.rounds={t.rounds} makes each round one pass over the train data: leave train.max_steps "
            f"0 and train.num_epochs 1 (got {t.max_steps} and {t.num_epochs})"
        )
    moving = d.ref_update != "none" or t.rounds > 1
    what = f"dpo.ref_update={d.ref_update}" if d.ref_update != "none" else f"train.rounds={t.rounds}"
    if moving and d.reference == "none":
        raise ConfigError(f"{what} updates the reference, but dpo.reference is none: use cached or online")
    metric = t.keep_best.rpartition(":")[0]
    if moving and t.keep_best and metric not in REFERENCE_FREE_EVAL:
        raise ConfigError(
            f"train.keep_best={t.keep_best!r} with {what}: the eval loss and rewards are measured against "
            "the reference, which this run moves (each round or update restarts them near their start), so "
            "evals on either side of a move do not compare and the best would stay before the first one; "
            "name a metric of the policy alone (eval/logps/chosen:max, the chosen completions' "
            "log-probability; eval/logps/rejected:min), or leave train.keep_best empty"
        )
    if d.ref_update != "none":
        if d.ref_update_every < 1:
            raise ConfigError(f"dpo.ref_update_every must be >= 1, got {d.ref_update_every}")
        if not 0.0 < d.ref_update_alpha <= 1.0:
            raise ConfigError(f"dpo.ref_update_alpha must be in (0, 1], got {d.ref_update_alpha}")
    if d.ref_update == "soft" and d.reference == "cached":
        raise ConfigError(
            "dpo.ref_update=soft with dpo.reference=cached: a soft update makes the reference a mix of "
            "the policy and the old reference, weights that exist nowhere but in memory, so every update "
            "would have to keep them resident and run a full reference pass anyway; use dpo.reference "
            "online (the mixed reference is kept on the device), or dpo.ref_update hard (the cache is "
            "recomputed from the policy's weights)"
        )
    if d.beta_schedule == "adaptive":
        if d.target_kl <= 0:
            raise ConfigError(f"dpo.beta_schedule=adaptive needs dpo.target_kl > 0, got {d.target_kl}")
        if d.beta_gain <= 0:
            raise ConfigError(f"dpo.beta_gain must be > 0, got {d.beta_gain}")
        if d.reference == "none":
            raise ConfigError(
                "dpo.beta_schedule=adaptive steers the KL to the reference, but dpo.reference is none"
            )


def _validate_online(cfg: Config) -> None:
    """dpo.online's settings (the reward function itself is imported and probed by `jdpo.train.online` when the
    data loads, before the model)."""
    on, d = cfg.online, cfg.dpo
    if not d.online:
        return
    if d.reference == "cached":
        raise ConfigError(
            "dpo.online samples new completions every step, so their reference log-probs cannot be cached "
            "before training: set dpo.reference online (a frozen copy of the initial weights; under LoRA the "
            "base with the initial adapters, no copy) or none (reference-free losses)"
        )
    if cfg.train.rounds > 1:
        raise ConfigError(
            f"train.rounds={cfg.train.rounds} with dpo.online: rounds are passes over a fixed pair set; an "
            "online run samples new pairs every step. Use dpo.ref_update hard with dpo.ref_update_every "
            "(the policy becomes the reference every N steps) instead"
        )
    if d.unpaired:
        raise ConfigError(f"dpo.online trains on best-vs-worst pairs: dpo.loss_type {d.loss_type[0]} takes "
                          "rated examples; use a pair loss (e.g. sigmoid)")  # fmt: skip
    module, _, name = on.reward.rpartition(":")
    if not module or not name:
        raise ConfigError(
            f"online.reward={on.reward!r} must be 'module:function' (or 'path/to/file.py:function'), e.g. "
            "jdpo.demo:sum_reward"
        )
    for field_name, value, lo in [
        ("online.samples_per_prompt", on.samples_per_prompt, 2),
        ("online.prompts_per_step", on.prompts_per_step, 1),
        ("online.max_new_tokens", on.max_new_tokens, 1),
    ]:
        if value < lo:
            raise ConfigError(f"{field_name} must be >= {lo}, got {value}")
    if on.temperature <= 0:
        raise ConfigError(f"online.temperature must be > 0 (greedy samples of one prompt are all equal and "
                          f"always tie), got {on.temperature}")  # fmt: skip
    if not 0 < on.top_p <= 1:
        raise ConfigError(f"online.top_p must be in (0, 1], got {on.top_p}")
    if not on.reward_timeout >= 0:
        raise ConfigError(f"online.reward_timeout must be >= 0 s (0: no bound), got {on.reward_timeout}")


def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    if lo.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0 (0: full fine-tuning), got {lo.rank}")
    if lo.rank == 0:
        if lo.init_adapter:
            raise ConfigError(f"lora.init_adapter={lo.init_adapter!r} needs lora.rank > 0 (its rank)")
        if lo.quantize != "none":
            raise ConfigError(f"lora.quantize={lo.quantize} quantises a frozen base: it needs lora.rank > 0")
        if lo.dropout:
            raise ConfigError(f"lora.dropout={lo.dropout} drops adapter inputs: it needs lora.rank > 0")
        return
    if lo.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {lo.alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    unknown = [t for t in lo.targets if t not in LORA_TARGETS]
    if unknown or not lo.targets:
        raise ConfigError(
            f"lora.targets: {unknown or 'empty'} are not modules of the model; its modules are "
            f"{', '.join(LORA_TARGETS)}"
        )
    if cfg.dpo.reference_path:
        raise ConfigError(
            "dpo.reference_path with lora.rank > 0: the reference of a LoRA run is the base with its "
            "initial adapter (lora.init_adapter); leave dpo.reference_path empty"
        )


# Settings a resumed run may change freely: they decide what is logged, saved, where, and how the same
# computation is laid out on devices, not what is computed (the attention kernels agree to float rounding).
RESUMABLE_CHANGES = frozenset({
    "train.output_dir", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.log_every", "train.export", "train.early_stop_patience", "train.early_stop_accuracy",
    "train.allow_config_change", "train.allow_base_change", "train.keep_best", "train.divergence_factor",
    "train.max_param_abs", "dpo.cache_dir", "train.compile_cache", "model.remat", "model.attention",
    "model.attention_block", "mesh.data", "mesh.fsdp", "mesh.tensor", "logging.console",
    "logging.tensorboard", "logging.wandb", "logging.wandb_project",
})  # fmt: skip


def config_changes(saved: dict[str, dict[str, Any]], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(dotted name, saved value, new value) for every field of `cfg` that differs from `saved` (a
    `to_dict` of the config a run was started or last resumed with). Fields `saved` lacks (a config
    from an older jdpo) count as unchanged."""
    new = to_dict(cfg)
    return [
        (f"{s}.{k}", saved[s][k], v)
        for s, fields in new.items()
        for k, v in fields.items()
        if s in saved and k in saved[s] and saved[s][k] != v
    ]


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dict (tuples as lists): what gets written next to a run's outputs as config.yaml."""
    return {
        s: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
        for s in sections()
    }


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with load_config to an equal Config)."""
    import yaml

    from jdpo.paths import as_path

    as_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # local or gs:// (epath)
