"""A reference that moves: TR-DPO's updates (`dpo.ref_update`) and iterative DPO's rounds (`train.rounds`).

TR-DPO (Gorbatovski et al. 2024) updates the reference every `dpo.ref_update_every` steps:

    soft:  ref <- alpha * policy + (1 - alpha) * ref      (alpha = dpo.ref_update_alpha)
    hard:  ref <- policy                                   (alpha = 1)

Iterative DPO (`train.rounds`) trains one pass over the data per round and makes the policy the reference
(a hard update) after each round but the last.

How the reference moves depends on where it lives:
- `dpo.reference: online`: the state's frozen copy "ref_params" is updated on the device by
  `soft_update` / `hard_update` under jit (`jdpo.train.step.Steps.update_reference`, the old reference
  donated, sharded like the params), and it is then part of the checkpoint (it is no longer the initial
  weights a resume could reload).
- `cached`: a hard update recomputes the cache of both splits from the current weights (their fingerprint
  is in the cache key, so each update's cache is its own entry); the checkpoint's meta names the entries,
  and a resume loads them by key. A soft update has no weights to cache (config.validate refuses it).
- LoRA: the reference is the frozen base with the reference adapters, so the update applies to the
  adapters (online: the adapter-sized ref_params; cached: the cache of (adapters, base)). A soft update then
  mixes the adapter factors A and B, not their product: the reference's delta is not the mix of the two
  deltas (a hard update is exact).

`UpdateSchedule` says which update (if any) follows a step; the loop runs it after the step's eval (which
measures the policy against the reference it trained with) and before the step's checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HARD, SOFT = "hard", "soft"


def soft_update(policy, reference, alpha: float, zero=None):
    """alpha * policy + (1 - alpha) * reference, leaf by leaf, exactly as written: float32 arithmetic
    with alpha and 1 - alpha rounded to float32 once, each product rounded to float32 before the sum, the
    result in the reference's dtype. alpha = 1 gives the policy and alpha = 0 the reference exactly (for
    finite weights).

    `zero`: a traced uint32 0 (an argument of the jitted caller). Compilers contract a * p + b * r into
    a fused multiply-add, rounding one product less (XLA on CPU does: ~20% of the entries then differ in
    the last bit); xor-ing each product's bits with a value the compiler cannot see keeps both products
    rounded, at no extra memory. Without it (eager calls, where every op is rounded anyway) a constant."""
    a = np.float32(alpha)
    b = np.float32(1.0 - alpha)
    zero = jnp.uint32(0) if zero is None else zero

    def rounded(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32) ^ zero
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    def mix(p, r):
        return (rounded(a * p.astype(jnp.float32)) + rounded(b * r.astype(jnp.float32))).astype(r.dtype)

    return jax.tree.map(mix, policy, reference)


def hard_update(policy, reference):
    """The policy, copied into the reference's structure and dtypes (`reference` only gives the layout)."""
    return jax.tree.map(lambda p, r: jnp.copy(p).astype(r.dtype), policy, reference)


class UpdateSchedule:
    """Which reference update follows a step: `after(step, round_ended)` -> "hard", "soft" or None.

    A round's end (train.rounds, not after the last round) is a hard update; otherwise dpo.ref_update every
    dpo.ref_update_every steps, never after the run's last step (nothing would use it)."""

    def __init__(self, dpo, train, total_steps: int):
        self.kind, self.every = dpo.ref_update, dpo.ref_update_every
        self.rounds, self.total_steps = train.rounds, total_steps

    @property
    def moves(self) -> bool:
        """The reference changes during the run (so it is checkpointed / named in the meta)."""
        return self.kind != "none" or self.rounds > 1

    def after(self, step: int, round_ended: bool) -> str | None:
        if step >= self.total_steps:
            return None
        if round_ended:
            return HARD
        if self.kind != "none" and step % self.every == 0:
            return self.kind
        return None
