"""The train state: one typed pytree that the jitted step takes and returns, and its checkpointed part.

Every field is an array pytree or None (a part this run does not have); None is an empty subtree, so
a `TrainState` of shardings with the same None fields is the step's in / out shardings, and a
`TrainState` of `ShapeDtypeStruct`s its abstract value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jdpo.losses.unpaired import running_moments_init
from jdpo.train.checkpoint import abstract_like, nest, unnest

# Parts never saved: the online reference (the initial weights or adapters) and a LoRA run's frozen
# base, both reloaded on resume. A reference that moves is saved (`TrainState.frozen(moving_reference)`).
FROZEN = ("ref_params", "base")


@struct.dataclass
class TrainState:
    params: Any  # the trained parameters: the whole model, or a LoRA run's adapters
    opt_state: Any  # optax state over `params`, sharded like them
    step: Any  # int32 scalar: optimizer steps taken
    rng: Any  # uint32 key data: advanced every step (LoRA dropout), checkpointed
    ref_params: Any = None  # `dpo.reference: online`: the reference weights (LoRA: adapters)
    base: Any = None  # LoRA: the frozen base, passed through the step unchanged
    bco_moments: Any = None  # bco / bco_pair: the running reward mean / variance / count
    beta: Any = None  # `dpo.beta_schedule: adaptive`: the current beta (float32 scalar)

    def parts(self) -> tuple[str, ...]:
        """The names of the fields this run has (not None)."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.parts()}

    def to_checkpoint(self, frozen: tuple[str, ...] = FROZEN) -> dict:
        """The saved part as orbax stores it: nested plain dicts of arrays, `frozen` fields left out."""
        return nest(self.as_dict(), exclude=frozen)

    def from_checkpoint(self, saved: dict, frozen: tuple[str, ...] = FROZEN) -> TrainState:
        """This state with the saved fields' arrays from `saved` (`frozen` fields kept as they are)."""
        return TrainState(**unnest(saved, self.as_dict(), exclude=frozen))

    def abstract_checkpoint(self, frozen: tuple[str, ...] = FROZEN) -> dict:
        """The abstract target (shape, dtype, sharding) a checkpoint of this state restores into."""
        return abstract_like(self.to_checkpoint(frozen))


def frozen_parts(moving_online_reference: bool) -> tuple[str, ...]:
    """The fields a checkpoint leaves out: an online reference that moves is saved."""
    return ("base",) if moving_online_reference else FROZEN


def initial_state(steps, params, *, seed: int, ref_params=None, base=None, dpo=None) -> TrainState:
    """Step 0: `steps` (`jdpo.train.step.Steps`) gives the optimizer state and the reference copy;
    committed to exactly the shardings the step returns (an uncommitted scalar would make step 2, whose
    inputs are step 1's outputs, compile a second time)."""
    state = TrainState(
        params=params,
        opt_state=steps.init_opt(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        ref_params=None if ref_params is None else steps.copy_params(ref_params),
        base=base,
        bco_moments=running_moments_init() if dpo.running_reward_mean else None,
        beta=jnp.asarray(dpo.beta, jnp.float32) if dpo.beta_schedule == "adaptive" else None,
    )
    return jax.device_put(state, steps.state_shardings)
