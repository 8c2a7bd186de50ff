"""`LossSpec`: a run's loss as one frozen, hashable value, built once from the config.

The train step, the in-training eval and `jdpo eval` all take it (`jdpo.scoring.batch_loss` reads
nothing else), so the map from settings to loss arguments is written once, here. Plain Python fields
only: it is a static argument of the jitted step and hashes into its compile-cache key. No jax, so the
config (and `jdpo --help`) builds it without loading the loss library.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jdpo.losses.defaults import DEFAULTS, UNPAIRED_LOSS_TYPES

# LossSpec fields that are `jdpo.dpo_loss` options of the same name.
PAIR_OPTIONS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "simpo_gamma",
    "f_alpha",
    "discopop_tau",
    "orpo_include_nll",
)
# The options of `jdpo.kto_loss` besides loss_type and beta (the unpaired losses).
UNPAIRED_OPTIONS = ("desirable_weight", "undesirable_weight")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss of a run: `dpo_loss`'s options (or `kto_loss`'s for kto / bco / apo_zero_unpaired), WPO
    weighting, and the adaptive beta schedule's parameters. Build it with `DPOSection.loss_spec()`."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None  # None: 1 per loss type
    beta: float = DEFAULTS["beta"]  # the initial beta under the adaptive schedule
    label_smoothing: float = DEFAULTS["label_smoothing"]
    simpo_gamma: float = DEFAULTS["simpo_gamma"]
    f_alpha: float = DEFAULTS["f_alpha"]
    discopop_tau: float = DEFAULTS["discopop_tau"]
    orpo_include_nll: bool = DEFAULTS["orpo_include_nll"]
    desirable_weight: float = DEFAULTS["desirable_weight"]
    undesirable_weight: float = DEFAULTS["undesirable_weight"]
    wpo: bool = False  # weight each pair by its WPO weight (pair losses only)
    # (target KL, gain) of the adaptive beta schedule: beta is then the train state's, passed to the loss
    # traced; None: beta stays `beta`.
    adaptive_beta: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # Lists would make the spec unhashable (it is a jit static argument); normalise to tuples.
        object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights) or None)

    @property
    def unpaired(self) -> bool:
        """The loss is one of the unpaired losses (`jdpo.kto_loss`): the data are rated examples."""
        return any(t in UNPAIRED_LOSS_TYPES for t in self.loss_type)

    @property
    def running_reward_mean(self) -> bool:
        """The loss shifts its rewards by BCO's running reward mean, kept in the train state."""
        return any(t in ("bco", "bco_pair") for t in self.loss_type)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `jdpo.dpo_loss` (everything but the log-probs, lengths, weights,
        reduction and bco_delta, which the caller takes from the batch and the train state)."""
        return {name: getattr(self, name) for name in PAIR_OPTIONS}

    def unpaired_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `jdpo.kto_loss` (but the inputs, kl / delta, weights and reduction)."""
        return {"loss_type": self.loss_type[0], "beta": self.beta,
                **{name: getattr(self, name) for name in UNPAIRED_OPTIONS}}  # fmt: skip

    def for_eval(self, labelled: bool) -> LossSpec:
        """The spec of an eval pass: without WPO weights; on pairs (`labelled` False) an unpaired loss
        becomes the sigmoid loss at its beta, whose implicit reward beta * (policy - reference) is the
        same, so preference accuracy and margins are comparable."""
        if self.unpaired and not labelled:
            return dataclasses.replace(self, loss_type=("sigmoid",), loss_weights=None, wpo=False)
        return dataclasses.replace(self, wpo=False)
