"""Defaults of the loss hyper-parameters (`jdpo.dpo_loss`, `jdpo.kto_loss`): the one place they are written.

A module of its own, without jax, so that the config's `dpo` section (and so `jdpo --help`) takes its
defaults from the loss library without loading it.
"""

DEFAULTS: dict[str, float | bool] = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "simpo_gamma": 0.5,
    "f_alpha": 1.0,
    "discopop_tau": 0.05,
    "bco_delta": 0.0,
    "orpo_include_nll": True,
    # kto_loss (KTO / BCO / APO-zero unpaired): the class weights lambda_D, lambda_U of the KTO paper, 1 as
    # TRL's KTOConfig. beta above is shared (TRL's KTOConfig and BCOConfig default to 0.1 too).
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
}

# The loss types of `jdpo.kto_loss` (here, without jax, for the config).
UNPAIRED_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired", "bco")


def metric_names(loss_types: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The metrics the loss library reports for `loss_types` (a run's `dpo.loss_type`; a step's means and
    an eval's, which add the "eval/" prefix): `dpo_loss`'s rewards and log-probs, a mix's per-type losses,
    ORPO's odds; `kto_loss`'s per-class means and counts, KTO's KL estimate, BCO's reward shift."""
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins"]
    names += ["logps/chosen", "logps/rejected"]
    if any(t in UNPAIRED_LOSS_TYPES for t in loss_types):
        names += ["count/chosen", "count/rejected"]
        names += ["kl"] if "kto" in loss_types else ["delta"] if "bco" in loss_types else []
        return tuple(names)
    names.append("rewards/accuracies")
    if len(loss_types) > 1:
        names += [f"loss/{t}" for t in loss_types]
    if "orpo" in loss_types:
        names += ["log_odds_ratio", "log_odds_chosen"]
    return tuple(names)
