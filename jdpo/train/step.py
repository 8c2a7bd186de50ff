"""The pure, jitted step functions of a run: the optimizer, the train step and the policy forward.

The state is a `jdpo.train.state.TrainState` (params, optimizer state, step, RNG, and the parts a
run's settings add: the online reference, the LoRA base, BCO's moments, the adaptive beta); the model's
graph definition is static and lives outside it (`nnx.split` / `nnx.merge` at the jit boundary), so the
step is `train_step(state, batch) -> (state, metrics)` under `jax.jit` with explicit in / out
shardings over the ("data", "fsdp", "tensor") mesh and the state donated. The optimizer state is
sharded like the parameters.

One step = `grad_accum` micro-batches [A, B, T] scanned inside the jit; each contributes the SUM of
its per-slot losses (`jdpo.scoring.batch_loss`: pairs, or rated examples for the unpaired losses) and its
number of valid slots, and the gradient is divided by the step's total count once, so 1 x 8 and
8 x 1 accumulation are the same optimisation (up to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jdpo.config import OptimSection
from jdpo.data.batch import Batch
from jdpo.losses.spec import LossSpec
from jdpo.losses.unpaired import running_moments_init
from jdpo.parallel.sharding import batch_sharding, jit_on_mesh
from jdpo.scoring.batch_loss import slot_losses, step_means
from jdpo.scoring.forward import pair_logprobs
from jdpo.train import beta_schedule, reference_update
from jdpo.train.router_loss import MoESettings
from jdpo.train.state import TrainState


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup over `warmup_ratio` of the steps then cosine decay to 0, after
    global-norm clipping. Returns (optimizer, learning-rate schedule)."""
    warmup = int(cfg.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
    return adamw, schedule


# Positions per chunk of the log-prob scan (each device's rows are one group, so a chunk's float32 logits
# are LOGPROB_CHUNK x V): 256 ran the bench's log-prob fwd+bwd in 802 ms vs 849 ms at 128, 782 ms at 512.
LOGPROB_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything static the step functions close over. Hashable: compiled functions are shared
    between runs with equal settings (repeated runs in one process, test suites) via `compiled_steps`."""

    graphdef: Any
    mesh: Any
    abstract_params: tuple  # (treedef, leaves): ShapeDtypeStructs carrying the parameter shardings
    loss: LossSpec  # the loss, built once from the config (`DPOSection.loss_spec`)
    reference: str  # dpo.reference: cached / online / none
    ref_update_alpha: float  # dpo.ref_update_alpha (a soft update of the online reference)
    optim: OptimSection
    total_steps: int
    chunk_size: int = LOGPROB_CHUNK
    # LoRA (`jdpo.models.lora`): the frozen base as (treedef, leaves); the params above are then the adapters.
    abstract_base: tuple | None = None
    # A mixture-of-experts model's router terms (`jdpo.train.router_loss`); None: a dense model.
    moe: MoESettings | None = None

    def params_like(self):
        return jax.tree.unflatten(*self.abstract_params)

    def param_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.params_like())

    def model_param_shardings(self):
        """Shardings of what `forward` takes: the params, or (adapters, base) in a LoRA run."""
        if self.abstract_base is None:
            return self.param_shardings()
        base = jax.tree.unflatten(*self.abstract_base)
        return self.param_shardings(), jax.tree.map(lambda x: x.sharding, base)


def _model(s: StepSettings, params, base=None):
    """The model of the trained params (full fine-tuning), or of adapters + the frozen base (LoRA)."""
    return nnx.merge(s.graphdef, params) if base is None else nnx.merge(s.graphdef, params, base)


def _micro_loss(
    s: StepSettings, params, ref_params, base, batch: Batch, moments, dropout_key, beta=None, aux_weight=None
):
    """Summed per-slot loss of one micro-batch, and (the sums its metrics are made of, with the slot count
    in "pairs"; BCO's running moments after it, None when the loss keeps none). Sums, not means: the
    caller divides by the step's total count once. With LoRA the online reference is the frozen base
    with the reference adapters (no second copy of the base). `dropout_key` drives LoRA dropout in the
    policy forward only (the reference is deterministic). `beta`: the state's (adaptive schedule),
    traced; then the sums also hold the completions' log-ratio sum and count (KL_SUMS). An MoE model's
    policy forward adds its router terms (`MoESettings.micro_terms`, `aux_weight` its multiplier)."""
    out = pair_logprobs(
        _model(s, params, base), batch, chunk_size=s.chunk_size, dropout_key=dropout_key,
        router_stats=s.moe is not None,
    )  # fmt: skip
    if s.reference == "online":
        ref = pair_logprobs(_model(s, ref_params, base), batch, chunk_size=s.chunk_size)
        ref_c, ref_r = jax.lax.stop_gradient(ref["chosen"]), jax.lax.stop_gradient(ref["rejected"])
    else:  # cached: looked up on the host and attached to the batch; none: reference-free losses
        ref_c, ref_r = batch.ref_chosen_logps, batch.ref_rejected_logps
    valid_BxP = batch.valid_pairs.astype(jnp.float32)
    loss_BxP, m, moments = slot_losses(
        s.loss, out, ref_c, ref_r, valid_BxP, labels=batch.labels, moments=moments, beta=beta
    )
    sums = {k: jnp.sum(v) for k, v in m.items()}
    if beta is not None:
        # Unpaired slots: the rated completion only (the second segment is KTO's mismatched KL one).
        pair = not s.loss.unpaired
        sums[KL_SUMS[0]], sums[KL_SUMS[1]] = beta_schedule.sequence_kl(
            jax.lax.stop_gradient(out["chosen"]), ref_c, valid_BxP,
            jax.lax.stop_gradient(out["rejected"]) if pair else None, ref_r if pair else None,
        )  # fmt: skip
    sums["loss"] = jnp.sum(loss_BxP)
    sums["pairs"] = jnp.sum(valid_BxP)
    objective = sums["loss"]
    if s.moe is not None:
        aux_term, router_sums = s.moe.micro_terms(out["router"], aux_weight)
        objective = objective + aux_term
        sums.update(router_sums)
    return objective, (sums, moments)


STATE_FINITE = "state_finite"  # a train-step output, not a logged metric
# The metric of the beta a step's loss used (`dpo.beta_schedule: adaptive`).
BETA = "beta"
# Step sums of the completions' log-ratios and their count (the adaptive schedule's KL estimate).
KL_SUMS = ("_kl_sum", "_kl_count")


def _all_finite(tree) -> jax.Array:
    """One bool: every floating-point leaf of `tree` is finite (one fused reduction per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _abs_max(tree) -> jax.Array:
    """The largest |x| over the floating-point leaves of `tree` (NaN when any is NaN), in float32."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves]))


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of one StepSettings (see `compiled_steps`)."""

    train_step: Callable  # (state, Batch[A, B, T]) -> (state, metrics); state donated
    # (params, Batch[B, T]) -> per-pair log-probs / counts [B, P] (reference, eval); with LoRA the params
    # are (adapters, base)
    forward: Callable
    init_opt: Callable  # params -> optimizer state, born sharded like the params
    copy_params: Callable  # params -> a copy in fresh buffers (the frozen online reference)
    schedule: Callable
    state_shardings: TrainState
    # "hard" / "soft" -> (ref_params, params) -> new ref_params, the old donated (`jdpo.train.reference_update`);
    # {} without an online reference
    update_reference: dict


def _train_step_fn(s: StepSettings, tx, schedule, param_sh) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`: the micro-batches' gradient summed, divided by the
    step's pair count once, then AdamW; the metrics include the new state's finiteness for the loop."""

    def train_step(state, batch):
        params, ref_params, base = state.params, state.ref_params, state.base
        beta = state.beta  # None: dpo.beta, a constant of the compiled step
        aux_weight = None if s.moe is None else s.moe.aux_weight(batch)
        grad_fn = jax.grad(functools.partial(_micro_loss, s, aux_weight=aux_weight), has_aux=True)

        # LoRA dropout's key of micro-batch i: the step's key (state.rng, advanced every step) with i
        # folded in, so a resumed run draws the same masks.
        step_key = jax.random.wrap_key_data(state.rng)

        def step_key_of(i):
            return jax.random.fold_in(step_key, i)

        def micro(carry, xs):
            mb, i = xs
            g_acc, sums_acc, moments = carry
            g, (sums, moments) = grad_fn(params, ref_params, base, mb, moments, step_key_of(i), beta)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, sums_acc, sums), moments), None

        # BCO's running reward moments: updated micro-batch by micro-batch (TRL: per forward).
        moments0 = state.bco_moments
        first = jax.tree.map(lambda x: x[0], batch)
        A = jax.tree.leaves(batch)[0].shape[0]
        if A == 1:  # one micro-batch: no loop to carry sums through (a smaller program, traced once)
            g, (sums, moments) = grad_fn(params, ref_params, base, first, moments0, step_key_of(0), beta)
            grads = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        else:
            sums_shape = jax.eval_shape(
                lambda: _micro_loss(s, params, ref_params, base, first, moments0, step_key, beta, aux_weight)[
                    1
                ][0]
            )
            carry0 = (
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape),
                moments0,
            )
            micro_ids = jnp.arange(A, dtype=jnp.int32)
            (grads, sums, moments), _ = jax.lax.scan(micro, carry0, (batch, micro_ids))
        # Divide once by the step's pair count: every pair weighs the same however the rows were split.
        n = jnp.maximum(sums["pairs"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
        grads = jax.lax.with_sharding_constraint(grads, param_sh)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        if s.moe is not None:
            updates = s.moe.freeze(updates)
        new_params = optax.apply_updates(params, updates)
        # The RNG advances every step so that anything stochastic in the step (LoRA dropout) gets fresh,
        # checkpointed randomness; the built-in losses use none.
        rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
        new_state = state.replace(params=new_params, opt_state=opt_state, step=state.step + 1, rng=rng,
                                  bco_moments=moments)  # fmt: skip
        kl_sum, kl_count = (sums.pop(k, None) for k in KL_SUMS)
        router = {} if s.moe is None else s.moe.metrics(sums, A)
        out = step_means(s.loss, sums)
        out.update(router)
        if router and s.moe.aux_loss_coef > 0:
            out["loss"] = out["loss"] + s.moe.aux_loss_coef * router["aux_loss"]
        if beta is not None:
            kl = kl_sum / jnp.maximum(kl_count, 1.0)
            new_state = new_state.replace(beta=beta_schedule.adaptive_beta(beta, kl, *s.loss.adaptive_beta))
            out[BETA], out["ref_kl"] = beta, kl  # the beta this step's loss used, and its KL estimate
        # Checked by the loop before the state is checkpointed: a finite loss can still come with
        # non-finite weights (e.g. an overflowing update), and such a checkpoint must never be "good".
        # The largest weight magnitude (the divergence guard's bound) is NaN / inf exactly when a weight
        # is, so it doubles as the parameters' finiteness check: one reduction over the weights.
        out["param_abs_max"] = _abs_max(new_params)
        out[STATE_FINITE] = jnp.isfinite(out["param_abs_max"]) & _all_finite(opt_state)
        out["grad_norm"] = optax.tree.norm(grads)
        out["learning_rate"] = schedule(state.step)
        return new_state, out

    return train_step


@functools.lru_cache(maxsize=8)
def compiled_steps(s: StepSettings) -> Steps:
    """The step functions under `jax.jit` with explicit in / out shardings (and donation of the state)."""
    tx, schedule = make_optimizer(s.optim, s.total_steps)
    replicated = NamedSharding(s.mesh, PartitionSpec())
    param_sh = s.param_shardings()

    def forward(params, batch):
        model_params = (params,) if s.abstract_base is None else params  # (adapters, base) with LoRA
        return pair_logprobs(_model(s, *model_params), batch, chunk_size=s.chunk_size)

    abstract_opt = jax.eval_shape(tx.init, s.params_like())
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, param_sh, transform_non_params=lambda _: replicated
    )
    state_sh = TrainState(
        params=param_sh,
        opt_state=opt_sh,
        step=replicated,
        rng=replicated,
        ref_params=param_sh if s.reference == "online" else None,  # with LoRA: the reference adapters
        # frozen: passed through the step unchanged
        base=None if s.abstract_base is None else s.model_param_shardings()[1],
        bco_moments=jax.tree.map(lambda _: replicated, running_moments_init())
        if s.loss.running_reward_mean
        else None,
        beta=replicated if s.loss.adaptive_beta is not None else None,
    )
    rows_acc, rows = batch_sharding(s.mesh, accum=True), batch_sharding(s.mesh)

    def on_mesh(fn, **kw):
        return jit_on_mesh(fn, s.mesh, **kw)

    return Steps(
        train_step=on_mesh(
            _train_step_fn(s, tx, schedule, param_sh),
            in_shardings=(state_sh, rows_acc),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
            compile_apart=True,  # the compiler's heap returned before the step's buffers are laid out
        ),
        forward=on_mesh(forward, in_shardings=(s.model_param_shardings(), rows), out_shardings=rows),
        init_opt=on_mesh(tx.init, in_shardings=(param_sh,), out_shardings=opt_sh),
        copy_params=on_mesh(
            lambda p: jax.tree.map(jnp.copy, p), in_shardings=(param_sh,), out_shardings=param_sh
        ),
        schedule=schedule,
        state_shardings=state_sh,
        update_reference=_reference_updates(s, param_sh, on_mesh),
    )


def _reference_updates(s: StepSettings, param_sh, on_mesh) -> dict:
    """The online reference's updates, jitted: the old reference donated (updated in place), the result
    sharded like the params (with LoRA: the reference adapters). Compiled on first use."""
    if s.reference != "online":
        return {}
    alpha = s.ref_update_alpha
    replicated = NamedSharding(s.mesh, PartitionSpec())
    hard = on_mesh(
        lambda ref, p: reference_update.hard_update(p, ref),
        in_shardings=(param_sh, param_sh), out_shardings=param_sh, donate_argnums=0,
    )  # fmt: skip
    soft = on_mesh(
        lambda ref, p, zero: reference_update.soft_update(p, ref, alpha, zero),
        in_shardings=(param_sh, param_sh, replicated), out_shardings=param_sh, donate_argnums=0,
    )  # fmt: skip
    return {
        reference_update.HARD: hard,
        # The traced zero keeps the mix's products rounded (no fused multiply-add; see soft_update).
        reference_update.SOFT: lambda ref, p: soft(ref, p, jnp.zeros((), jnp.uint32)),
    }
