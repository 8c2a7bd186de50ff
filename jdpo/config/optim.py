"""The `optim` section (AdamW, its schedule and clipping), with its rules."""

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
    eps: float = setting(1e-8, "AdamW epsilon.")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay.")
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
