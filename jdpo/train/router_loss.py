"""A mixture-of-experts run's router terms in the train step (`MoESettings`): the load-balancing loss
added to the policy's loss (never the reference's) as `model.router_aux_loss_coef * aux`, its metrics
(`aux_loss`, TRL's name; `moe/expert_load_max` / `moe/expert_load_min`), and `model.freeze_router`.

Gradient accumulation: each micro-batch's aux loss is its own forward's (as transformers computes it per
forward) and the step's is their mean. The step divides the summed gradient by the step's pair count n
once, so a micro-batch adds `coef * aux * n / A` to its summed loss: after the division the objective is
mean pair loss + coef * mean aux, whatever A.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdpo.errors import ConfigError
from jdpo.losses.router import expert_load, load_balancing_loss

AUX_LOSS = "aux_loss"
LOAD_MAX, LOAD_MIN = "moe/expert_load_max", "moe/expert_load_min"
_SUMS = ("_router_aux", "_router_counts")  # step sums, popped before the means


@dataclasses.dataclass(frozen=True)
class MoESettings:
    """The router terms of a run on an MoE model (None in `StepSettings` for a dense one)."""

    aux_loss_coef: float = 0.0  # model.router_aux_loss_coef, resolved (the checkpoint's when unset)
    freeze_router: bool = False  # model.freeze_router

    def aux_weight(self, batch) -> jax.Array:
        """What one micro-batch's aux loss is multiplied by in its summed loss (see the module doc)."""
        A = batch.valid_pairs.shape[0]
        n = jnp.maximum(jnp.sum(batch.valid_pairs.astype(jnp.float32)), 1.0)
        return self.aux_loss_coef * n / A

    def micro_terms(self, stats, aux_weight):
        """(the term added to a micro-batch's summed loss, its sums for the metrics)."""
        aux = load_balancing_loss(stats["counts"], stats["probs"], stats["tokens"])
        term = aux_weight * aux if self.aux_loss_coef > 0 else jnp.zeros((), jnp.float32)
        return term, {_SUMS[0]: jax.lax.stop_gradient(aux), _SUMS[1]: jax.lax.stop_gradient(stats["counts"])}

    def metrics(self, sums: dict, micro_batches: int) -> dict:
        """Pops the router sums from the step's `sums`; the logged metrics. `loss` (the optimised
        objective, as TRL logs it) gains coef * aux when the coefficient is > 0."""
        aux = sums.pop(_SUMS[0]) / micro_batches
        load = expert_load(sums.pop(_SUMS[1]))
        return {AUX_LOSS: aux, LOAD_MAX: jnp.max(load), LOAD_MIN: jnp.min(load)}

    def freeze(self, updates):
        """The optimizer's updates with the routers' set to zero under `freeze_router` (the weight decay
        too: the router stays bitwise unchanged)."""
        if not self.freeze_router:
            return updates

        def zero_router(path, u):
            return jnp.zeros_like(u) if any(getattr(k, "key", None) == "router" for k in path) else u

        return jax.tree_util.tree_map_with_path(zero_router, updates)


def moe_settings(config, model_config) -> MoESettings | None:
    """The run's router terms from its `model` and `mesh` sections and the checkpoint's config (None for
    a dense model, which refuses the MoE settings), checked before the model loads."""
    m, where = config.model, f"model.path={config.model.path}"
    if not model_config.num_experts:
        for field, value, unset in (("model.router_aux_loss_coef", m.router_aux_loss_coef, None),
                                    ("model.freeze_router", m.freeze_router, False),
                                    ("mesh.expert", config.mesh.expert, 1)):  # fmt: skip
            if value != unset:
                raise ConfigError(
                    f"{field}={value}: {where} is a dense {model_config.family} model (no experts)"
                )
        return None
    X = config.mesh.expert
    if X > 1 and model_config.num_experts % X:
        raise ConfigError(
            f"mesh.expert={X} does not divide the {model_config.num_experts} experts of {where}"
        )
    coef = model_config.router_aux_loss_coef if m.router_aux_loss_coef is None else m.router_aux_loss_coef
    return MoESettings(aux_loss_coef=float(coef), freeze_router=m.freeze_router)
