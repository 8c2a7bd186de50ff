"""The `optim` section (AdamW, its schedule and clipping), with its rules: every value that would turn
the update into something else (ascent, a silent no-op clip) is refused with the valid range."""

from __future__ import annotations

from dataclasses import dataclass

from jdpo.config.fields import ConfigError, setting


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then cosine decay to 0, and global-norm clipping."""

    learning_rate: float = setting(5e-6, "Peak learning rate.")
    warmup_ratio: float = setting(0.1, "Fraction of the steps spent in linear warmup from 0.")
    b1: float = setting(0.9, "AdamW beta1.")
    b2: float = setting(0.95, "AdamW beta2.")
    eps: float = setting(1e-8, "AdamW epsilon (> 0).")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay (>= 0).")
    max_grad_norm: float = setting(1.0, "Clip gradients to this global norm (0 disables).")


def check_optim(o: OptimSection) -> None:
    for name, value, lo, hi in [
        ("optim.warmup_ratio", o.warmup_ratio, 0.0, 1.0),
        ("optim.b1", o.b1, 0.0, 1.0),
        ("optim.b2", o.b2, 0.0, 1.0),
    ]:
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value} is outside [{lo}, {hi}]")
    if o.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate must be > 0, got {o.learning_rate}")
    # AdamW divides by sqrt(v) + eps: eps <= 0 divides by zero or, negative, flips the update into ascent.
    if o.eps <= 0:
        raise ConfigError(f"optim.eps must be > 0 (AdamW divides by sqrt(v) + eps), got {o.eps}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0 (0: off; a negative decay grows the weights), "
                          f"got {o.weight_decay}")  # fmt: skip
    if o.max_grad_norm < 0:
        raise ConfigError(f"optim.max_grad_norm must be >= 0 (0: no clipping), got {o.max_grad_norm}")
