"""The `dpo` section: the preference loss, the reference model and how it moves; with the loss rules
(the loss library's own, named as config fields), the unpaired losses' rules and a moving reference's.

`DPOSection.loss_spec()` is the one map from these settings to the loss (`jdpo.losses.spec.LossSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from jdpo.config.fields import ConfigError, setting
from jdpo.losses.defaults import DEFAULTS
from jdpo.losses.spec import PAIR_OPTIONS, UNPAIRED_OPTIONS, LossSpec

if TYPE_CHECKING:
    from jdpo.config.schema import Config

# DPOSection fields that are `dpo_loss` / `kto_loss` options of the same name (see `loss_spec`).
LOSS_OPTIONS = PAIR_OPTIONS


@dataclass(frozen=True)
class DPOSection:
    """The preference loss and the reference model. The loss fields are `jdpo.dpo_loss`'s options,
    with its defaults."""

    loss_type: tuple[str, ...] = setting(
        ("sigmoid",),
        "Loss type(s); several are combined with loss_weights. kto, bco, apo_zero_unpaired: unpaired "
        "feedback (rated examples; pairs are split into a desirable and an undesirable one), alone.",
    )
    loss_weights: tuple[float, ...] = setting((), "Weights of the loss types (default: 1 each).")
    beta: float = setting(DEFAULTS["beta"], "Inverse temperature of the implicit reward (DPO beta).")
    label_smoothing: float = setting(
        DEFAULTS["label_smoothing"],
        "Label smoothing eps of cDPO / rDPO / EXO / AOT / SimPO / f-DPO: assumed fraction of flipped labels.",
    )
    simpo_gamma: float = setting(DEFAULTS["simpo_gamma"], "SimPO target reward margin gamma.")
    f_alpha: float = setting(DEFAULTS["f_alpha"], "Alpha of the alpha-divergence (f-DPO) loss.")
    discopop_tau: float = setting(DEFAULTS["discopop_tau"], "Temperature tau of the DiscoPOP loss.")
    orpo_include_nll: bool = setting(
        DEFAULTS["orpo_include_nll"], "ORPO: include the NLL of the chosen completion."
    )
    desirable_weight: float = setting(
        DEFAULTS["desirable_weight"], "Weight of the desirable examples (kto, bco, apo_zero_unpaired)."
    )
    undesirable_weight: float = setting(
        DEFAULTS["undesirable_weight"], "Weight of the undesirable examples (kto, bco, apo_zero_unpaired)."
    )
    wpo: bool = setting(
        False,
        "WPO: weight each pair's loss by the policy's length-normalised probability of its completions "
        "(no gradient through the weight).",
    )
    reference: Literal["cached", "online", "none"] = setting(
        "cached",
        "Reference log-probs. cached: one pass of the initial weights, stored on disk; "
        "online: a frozen copy in memory; none: reference-free losses.",
    )
    reference_path: str = setting("", "Reference checkpoint if not the initial policy (default: model.path).")
    cache_dir: str = setting(
        "", "Directory of reference log-prob caches (default: <output_dir>/../.jdpo_refcache)."
    )
    ref_update: Literal["none", "hard", "soft"] = setting(
        "none",
        "Move the reference toward the policy every ref_update_every steps (TR-DPO). hard: ref <- policy "
        "(a cached reference is recomputed); soft: ref <- alpha * policy + (1 - alpha) * ref (needs "
        "reference online). LoRA: the adapters move.",
    )
    ref_update_every: int = setting(512, "Steps between reference updates (dpo.ref_update hard / soft).")
    ref_update_alpha: float = setting(
        0.6, "TR-DPO's alpha of a soft reference update, in (0, 1] (1 is a hard update)."
    )
    beta_schedule: Literal["constant", "adaptive"] = setting(
        "constant",
        "Constant: beta stays dpo.beta. Adaptive: after every step beta <- beta * (1 + beta_gain * "
        "clip(KL / target_kl - 1, -0.2, 0.2)), from dpo.beta; KL is the step's mean policy-reference "
        "log-ratio (logged as ref_kl). Logged as beta.",
    )
    target_kl: float = setting(0.0, "The adaptive beta schedule's target sequence-level KL (> 0; nats).")
    beta_gain: float = setting(0.1, "Gain of the adaptive beta schedule, per step.")
    online: bool = setting(
        False,
        "Online DPO (the online section): every step samples completions of data.train's prompts from the "
        "policy, scores them with online.reward and trains on each prompt's best-vs-worst pair. Needs "
        "dpo.reference online or none.",
    )

    def loss_spec(self) -> LossSpec:
        """The loss these settings mean, built once for the step, the eval pass and `jdpo eval`."""
        return LossSpec(
            **{name: getattr(self, name) for name in PAIR_OPTIONS + UNPAIRED_OPTIONS},
            wpo=self.wpo,
            adaptive_beta=(self.target_kl, self.beta_gain) if self.beta_schedule == "adaptive" else None,
        )

    @property
    def unpaired(self) -> bool:
        """The loss is one of the unpaired losses (`jdpo.kto_loss`): the data are rated examples."""
        return self.loss_spec().unpaired

    @property
    def running_reward_mean(self) -> bool:
        """The loss shifts its rewards by BCO's running reward mean, kept in the train state."""
        return self.loss_spec().running_reward_mean


def check_loss(cfg: Config) -> None:
    """The loss options, by the loss library's own rules (one set of rules) named as config fields."""
    # Lazy: the loss library loads jax, which `import jdpo.config` (and `jdpo --help`) must not.
    from jdpo.losses.pairwise import check_options
    from jdpo.losses.unpaired import check_unpaired_options

    d, spec = cfg.dpo, cfg.dpo.loss_spec()
    try:
        if spec.unpaired:
            _check_unpaired(cfg)
            check_unpaired_options(**spec.unpaired_kwargs(), prefix="dpo.")
        else:
            check_options(**spec.loss_kwargs(), ref_missing=d.reference == "none", prefix="dpo.")
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def check_moving_reference(cfg: Config) -> None:
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
