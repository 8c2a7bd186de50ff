"""The `lora` section (low-rank adapters on a frozen, optionally quantised base), with its rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from jdpo.config.fields import ConfigError, setting
from jdpo.models.choices import EXPERT_TARGETS, LORA_TARGETS

if TYPE_CHECKING:
    from jdpo.config.schema import Config

# The projections a LoRA adapter may target, by their Hugging Face module names (every family has them).


@dataclass(frozen=True)
class LoRASection:
    """Parameter-efficient training: low-rank adapters on the frozen base (`jdpo.models.lora`)."""

    rank: int = setting(0, "LoRA rank r; 0 trains every weight (full fine-tuning).")
    alpha: float = setting(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank (as PEFT).")
    dropout: float = setting(
        0.0,
        "LoRA dropout (PEFT's lora_dropout): the probability of zeroing each adapter input in the policy's "
        "training forward; the reference, eval and generation use none.",
    )
    targets: tuple[str, ...] = setting(
        LORA_TARGETS,
        "Hugging Face module names that get adapters (default: all attention and MLP projections; on an MoE "
        "model the attention). An MoE model's experts: experts.gate_up_proj, experts.down_proj (one adapter "
        "per expert, PEFT's target_parameters).",
    )
    quantize: Literal["none", "int8", "nf4"] = setting(
        "none",
        "QLoRA base: the frozen projection kernels stored quantised. int8: per output channel scales; nf4: "
        "4-bit NormalFloat in blocks of 64 (4.5 bits per weight). Embeddings, norms and lm_head stay "
        "in param_dtype.",
    )
    init_adapter: str = setting(
        "",
        "PEFT adapter directory to start from (e.g. an SFT adapter): the initial policy and, with it, the "
        "reference.",
    )


def check_lora(cfg: Config) -> None:
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
    unknown = [t for t in lo.targets if t not in LORA_TARGETS + EXPERT_TARGETS]
    if unknown or not lo.targets:
        raise ConfigError(
            f"lora.targets: {unknown or 'empty'} are not modules of the model; its modules are "
            f"{', '.join(LORA_TARGETS)} (an MoE model's experts: {', '.join(EXPERT_TARGETS)})"
        )
    if cfg.dpo.reference_path:
        raise ConfigError(
            "dpo.reference_path with lora.rank > 0: the reference of a LoRA run is the base with its "
            "initial adapter (lora.init_adapter); leave dpo.reference_path empty"
        )
