"""DPO training: the train state, the pure jitted train step, evaluation, and the loop around them.

    result = jdpo.train.run(config, callbacks=[lambda m: print(m["step"], m.get("loss"))])
    result.final_dir   # <output_dir>/final, a Hugging Face checkpoint of the trained policy

The state is a plain pytree {"params", "opt_state", "step", "rng"} (plus "ref_params" with an online
reference): the model's graph definition is static and lives outside it (`nnx.split` / `nnx.merge` at
the jit boundary), so the step is `train_step(state, batch) -> (state, metrics)` under `jax.jit` with
explicit in / out shardings over the ("data", "fsdp", "tensor") mesh and the state donated. The
optimizer state is sharded like the parameters.

One step = `grad_accum` micro-batches [A, B, T] scanned inside the jit; each contributes the SUM of
its per-pair losses and its number of valid pairs, and the gradient is divided by the step's total
pair count once, so 1 x 8 and 8 x 1 accumulation are the same optimisation (up to float rounding).

Resume: `run` on an output directory with checkpoints continues from the newest one (parameters,
optimizer state, step, data-iterator position, early-stop bookkeeping), and the metrics it logs are
bit-identical to an uninterrupted run's. SIGTERM saves a checkpoint and returns cleanly; a non-finite
loss raises `NonFiniteLossError` naming the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jdpo import losses, metrics, refcache
from jdpo.batch import Batch
from jdpo.checkpoint import Checkpointer, abstract_like, from_checkpoint, to_checkpoint
from jdpo.config import Config, DPOSection, OptimSection
from jdpo.flops import batch_token_stats, throughput_metrics, total_peak_flops, train_flops
from jdpo.forward import PairLogps, over_split, pair_logprobs, split_metrics
from jdpo.sharding import batch_sharding, jit_on_mesh

log = logging.getLogger(__name__)

MAX_PAIRS_PER_ROW = 16
OVERFIT_ACCURACY = 0.8  # eval preference accuracy above this is suspicious on real preference data


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class RunResult:
    """What `run` returns."""

    step: int  # the last completed optimizer step
    metrics: dict[str, Any]  # the last logged train metrics
    eval_metrics: dict[str, Any]  # the last eval metrics (eval/ names), {} without an eval split
    output_dir: Path
    final_dir: Path | None  # the Hugging Face export, None when not exported
    metrics_path: Path
    checkpoint_dir: Path
    stop_reason: str  # completed | early_stop | sigterm | callback


# ------------------------------------------------------------------------------------------------
# The optimizer and the pure step functions
# ------------------------------------------------------------------------------------------------


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
    dpo: DPOSection  # the loss and reference settings, whole
    optim: OptimSection
    total_steps: int
    chunk_size: int = LOGPROB_CHUNK

    def params_like(self):
        return jax.tree.unflatten(*self.abstract_params)

    def param_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.params_like())


def _micro_loss(s: StepSettings, params, ref_params, batch: Batch):
    """Summed per-pair loss of one micro-batch and the sums its metrics are made of (pair count in
    "pairs"). Sums, not means: the caller divides by the step's total pair count once."""
    out = pair_logprobs(nnx.merge(s.graphdef, params), batch, chunk_size=s.chunk_size)
    if s.dpo.reference == "online":
        ref = pair_logprobs(nnx.merge(s.graphdef, ref_params), batch, chunk_size=s.chunk_size)
        ref_c, ref_r = jax.lax.stop_gradient(ref["chosen"]), jax.lax.stop_gradient(ref["rejected"])
    else:  # cached: looked up on the host and attached to the batch; none: reference-free losses
        ref_c, ref_r = batch.ref_chosen_logps, batch.ref_rejected_logps
    valid_BxP = batch.valid_pairs.astype(jnp.float32)
    loss_BxP, m = losses.dpo_loss(
        out["chosen"],
        out["rejected"],
        ref_c,
        ref_r,
        chosen_lengths=out["chosen_counts"],
        rejected_lengths=out["rejected_counts"],
        weights=valid_BxP,
        reduction="none",
        **s.dpo.loss_kwargs(),
    )
    sums = {k: jnp.sum(v) for k, v in m.items()}
    sums["loss"] = jnp.sum(loss_BxP)
    sums["pairs"] = jnp.sum(valid_BxP)
    return sums["loss"], sums


def _means(sums: dict) -> dict:
    """Sums over pairs -> means over pairs (the pair count stays as "pairs")."""
    n = jnp.maximum(sums["pairs"], 1.0)
    return {k: (v if k == "pairs" else v / n) for k, v in sums.items()}


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of one StepSettings (see `compiled_steps`)."""

    train_step: Callable  # (state, Batch[A, B, T]) -> (state, metrics); state donated
    forward: Callable  # (params, Batch[B, T]) -> per-pair log-probs / counts [B, P] (reference, eval)
    init_opt: Callable  # params -> optimizer state, born sharded like the params
    copy_params: Callable  # params -> a copy in fresh buffers (the frozen online reference)
    schedule: Callable
    state_shardings: dict


@functools.lru_cache(maxsize=8)
def compiled_steps(s: StepSettings) -> Steps:
    """The step functions under `jax.jit` with explicit in / out shardings (and donation of the state)."""
    tx, schedule = make_optimizer(s.optim, s.total_steps)
    replicated = NamedSharding(s.mesh, PartitionSpec())
    param_sh = s.param_shardings()

    def train_step(state, batch):
        params, ref_params = state["params"], state.get("ref_params")
        grad_fn = jax.grad(functools.partial(_micro_loss, s), has_aux=True)

        def micro(carry, mb):
            g_acc, sums_acc = carry
            g, sums = grad_fn(params, ref_params, mb)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

        first = jax.tree.map(lambda x: x[0], batch)
        sums_shape = jax.eval_shape(lambda: _micro_loss(s, params, ref_params, first)[1])
        carry0 = (
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape),
        )
        (grads, sums), _ = jax.lax.scan(micro, carry0, batch)
        # Divide once by the step's pair count: every pair weighs the same however the rows were split.
        n = jnp.maximum(sums["pairs"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
        grads = jax.lax.with_sharding_constraint(grads, param_sh)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # The RNG advances every step so that anything stochastic added to the step (dropout, sampled
        # losses) gets fresh, checkpointed randomness; the built-in losses use none.
        rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]))
        new_state = dict(state, params=new_params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
        out = _means(sums)
        out["grad_norm"] = optax.tree.norm(grads)
        out["learning_rate"] = schedule(state["step"])
        return new_state, out

    def forward(params, batch):
        return pair_logprobs(nnx.merge(s.graphdef, params), batch, chunk_size=s.chunk_size)

    abstract_opt = jax.eval_shape(tx.init, s.params_like())
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, param_sh, transform_non_params=lambda _: replicated
    )
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}
    if s.dpo.reference == "online":
        state_sh["ref_params"] = param_sh
    rows_acc, rows = batch_sharding(s.mesh, accum=True), batch_sharding(s.mesh)

    def on_mesh(fn, **kw):
        return jit_on_mesh(fn, s.mesh, **kw)

    return Steps(
        train_step=on_mesh(
            train_step,
            in_shardings=(state_sh, rows_acc),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        ),
        forward=on_mesh(forward, in_shardings=(param_sh, rows), out_shardings=rows),
        init_opt=on_mesh(tx.init, in_shardings=(param_sh,), out_shardings=opt_sh),
        copy_params=on_mesh(
            lambda p: jax.tree.map(jnp.copy, p), in_shardings=(param_sh,), out_shardings=param_sh
        ),
        schedule=schedule,
        state_shardings=state_sh,
    )


# ------------------------------------------------------------------------------------------------
# Set-up: model, tokenizer, data, reference, state
# ------------------------------------------------------------------------------------------------


def resolve_dtype(name: str):
    """'auto' -> bfloat16 on accelerators, float32 on CPU (where bfloat16 matmuls are slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def pairs_per_row(row_length: int, pair_lengths: Sequence[np.ndarray]) -> int:
    """P, pair slots per packed row: as many as the shortest pair allows, at most MAX_PAIRS_PER_ROW
    (slots cost a [B, T, 2P] one-hot in the per-segment sums, so no more than can ever be filled)."""
    shortest = min((int(x.min()) for x in pair_lengths if len(x)), default=row_length)
    return int(max(1, min(MAX_PAIRS_PER_ROW, row_length // max(shortest, 1))))


class Trainer:
    """One run's pieces, set up from a Config: mesh, model, tokenizer, data, reference log-probs,
    compiled step functions and the initial train state. `fit()` runs the loop."""

    def __init__(self, config: Config, *, mesh=None):
        from transformers import AutoTokenizer

        from jdpo import data as jdata
        from jdpo.models import from_pretrained
        from jdpo.sharding import make_mesh

        self.config = c = config
        if not c.model.path:
            raise ValueError("model.path is empty: give a Hugging Face checkpoint directory")
        self.mesh = mesh if mesh is not None else make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        self.output_dir = Path(c.train.output_dir)
        self.dtype = resolve_dtype(c.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(c.model.path)
        model, self.model_config = from_pretrained(
            c.model.path,
            dtype=self.dtype,
            param_dtype=jnp.dtype(c.model.param_dtype),
            mesh=self.mesh,
            remat=c.model.remat,
            scan_layers=c.model.scan_layers,
            attention=c.model.attention,
            attention_block=c.model.attention_block,
        )
        self.graphdef, params = nnx.split(model)

        # Data: records -> (train, eval) -> token ids -> fixed-shape batches.
        d = c.data
        records = jdata.load_preferences(
            list(d.train), d.format, seed=c.train.seed, skip_bad_rows=d.skip_bad_rows
        )
        if d.eval:
            held = jdata.load_preferences(
                list(d.eval), d.format, seed=c.train.seed, skip_bad_rows=d.skip_bad_rows
            )
        elif d.eval_fraction > 0:
            records, held = jdata.split_eval(records, d.eval_fraction, seed=c.train.seed)
        else:
            held = []
        tok_kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
        self.train_pairs, self.train_report = jdata.tokenize_preferences(records, self.tokenizer, **tok_kw)
        self.eval_pairs = jdata.tokenize_preferences(held, self.tokenizer, **tok_kw)[0] if held else None
        self.row_length = d.row_length or 2 * d.max_length
        lengths = [self.train_pairs.pair_lengths()]
        if self.eval_pairs is not None:
            lengths.append(self.eval_pairs.pair_lengths())
        self.max_pairs = pairs_per_row(self.row_length, lengths) if d.packing else 1
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if c.train.batch_rows % shards:
            raise ValueError(f"train.batch_rows={c.train.batch_rows} must divide over the {shards} row "
                             f"shards of the mesh (data x fsdp = {dict(self.mesh.shape)})")  # fmt: skip
        self.batch_kw = dict(
            rows_per_batch=c.train.batch_rows,
            row_length=self.row_length,
            max_pairs_per_row=self.max_pairs,
            packing=d.packing,
        )
        self.batches = jdata.PreferenceBatches(self.train_pairs, seed=c.train.seed, **self.batch_kw)
        if self.batches.dropped_too_long:
            log.warning("%d train pairs are longer than a row (%d tokens) and are left out",
                        self.batches.dropped_too_long, self.row_length)  # fmt: skip
        A = c.train.grad_accum
        self.batches_per_epoch = self.batches.num_batches(0)
        self.steps_per_epoch = self.batches_per_epoch / A
        self.total_steps = c.train.max_steps or max(1, math.ceil(c.train.num_epochs * self.steps_per_epoch))

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
        self.settings = StepSettings(
            graphdef=self.graphdef,
            mesh=self.mesh,
            abstract_params=(jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract))),
            dpo=c.dpo,
            optim=c.optim,
            total_steps=self.total_steps,
        )
        self.steps = compiled_steps(self.settings)

        # Reference log-probs of the initial weights (before the first step donates them).
        self.ref_train = self.ref_eval = None
        self.ref_reused: dict[str, bool] = {}
        self.ref_keys: dict[str, str] = {}
        if c.dpo.reference == "cached":
            ref_params = self._reference_params(params)
            self.ref_train = self._reference(ref_params, self.train_pairs, "train")
            if self.eval_pairs is not None:
                self.ref_eval = self._reference(ref_params, self.eval_pairs, "eval")
            if ref_params is not params:
                del ref_params
        state = {
            "params": params,
            "opt_state": self.steps.init_opt(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(c.train.seed)),
        }
        if c.dpo.reference == "online":
            state["ref_params"] = self.steps.copy_params(self._reference_params(params))
        # Committed to exactly the shardings the step returns: an uncommitted scalar here would make
        # step 2 (whose inputs are step 1's outputs) compile a second time.
        self.state = jax.device_put(state, self.steps.state_shardings)

    # -- reference ---------------------------------------------------------------------------------

    def _reference_params(self, params):
        """The reference weights: the initial policy, or `dpo.reference_path` when given."""
        from jdpo.models import from_pretrained

        path = self.config.dpo.reference_path
        if not path or Path(path).resolve() == Path(self.config.model.path).resolve():
            return params
        ref_model, ref_cfg = from_pretrained(
            path,
            dtype=self.dtype,
            param_dtype=jnp.dtype(self.config.model.param_dtype),
            mesh=self.mesh,
            scan_layers=self.config.model.scan_layers,  # the same parameter layout as the policy
        )
        if ref_cfg != self.model_config:
            raise ValueError(f"dpo.reference_path {path} has another architecture than model.path")
        return nnx.split(ref_model)[1]

    def cache_dir(self) -> Path:
        return Path(self.config.dpo.cache_dir or (self.output_dir.parent / ".jdpo_refcache"))

    def _reference(self, params, pairs, split: str) -> PairLogps:
        """Per-pair reference log-probs of one split, from the on-disk cache when its key matches."""
        d, m = self.config.data, self.config.model
        settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "split": split,
                    "dtype": jnp.dtype(self.dtype).name, "param_dtype": m.param_dtype}  # fmt: skip
        ref, reused, key = refcache.for_split(
            params,
            pairs,
            compute=lambda: self.logprobs(pairs, params),
            cache_dir=self.cache_dir(),
            model_config=self.model_config.to_hf(),
            tokenizer=self.tokenizer,
            settings=settings,
        )
        self.ref_reused[split], self.ref_keys[split] = reused, key
        return ref

    # -- batches -------------------------------------------------------------------------------------

    def one_pass(self, pairs):
        """Every pair of a split once, in order, as this run's training batches lay them out."""
        from jdpo import data as jdata

        return jdata.one_pass(pairs, **self.batch_kw)

    def logprobs(self, pairs, params=None) -> PairLogps:
        """Per-pair log-probs of every pair of a split under `params` (default: the current policy)."""
        params = self.state["params"] if params is None else params
        return over_split(self.steps.forward, params, self.one_pass(pairs), len(pairs), mesh=self.mesh)

    def next_step_batches(self) -> tuple[Batch, list[Batch]]:
        """The next optimizer step's micro-batches: (device batch [A, B, ...], host batches)."""
        host = [next(self.batches) for _ in range(self.config.train.grad_accum)]
        if self.config.dpo.reference == "cached":
            host = [self.ref_train.attach(b) for b in host]
        return Batch.stack(host).on_mesh(self.mesh, accum=True), host

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, params=None) -> dict[str, float]:
        """The loss and TRL's metrics (eval/ names) of the run's loss settings over the whole held-out
        split; {} when there is none."""
        if self.eval_pairs is None:
            return {}
        policy = self.logprobs(self.eval_pairs, params)
        if self.config.dpo.reference == "cached":
            ref = self.ref_eval
        elif self.config.dpo.reference == "online":
            ref = self.logprobs(self.eval_pairs, self.state["ref_params"])
        else:
            ref = None
        return split_metrics(policy, ref, self.config.dpo)

    def describe(self, start: int = 0) -> str:
        """A few lines on what this run is about to do (printed at the start of `fit`)."""
        c = self.config
        n_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        ref = c.dpo.reference + "".join(
            f", {k} {'reused' if v else 'computed'}" for k, v in self.ref_reused.items()
        )
        eval_pairs = len(self.eval_pairs) if self.eval_pairs is not None else 0
        return "\n".join([
            f"jdpo: {self.model_config.family} model, {n_params:,} parameters, "
            f"compute {jnp.dtype(self.dtype).name}, mesh {dict(self.mesh.shape)}",
            f"jdpo: {len(self.train_pairs):,} train pairs ({self.batches.dropped_too_long} too long), "
            f"{eval_pairs:,} eval pairs; rows of {self.row_length} tokens, <= {self.max_pairs} pairs each",
            f"jdpo: loss {'+'.join(c.dpo.loss_type)} (beta {c.dpo.beta}), reference {ref}; "
            f"{self.total_steps} steps of {c.train.batch_rows} rows x {c.train.grad_accum} "
            f"({self.steps_per_epoch:.1f} steps / epoch)" + (f"; resuming at step {start}" if start else ""),
        ])  # fmt: skip

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self, callbacks: Sequence[Callable[[dict], Any]] = ()) -> RunResult:
        """Train to `total_steps` (resuming from the newest checkpoint in the output directory)."""
        from jdpo.config import dump
        from jdpo.distributed import any_process
        from jdpo.models import save_pretrained

        c, t = self.config, self.config.train
        main = jax.process_index() == 0
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        if main:
            dump(c, out / "config.yaml")
        ckpt = Checkpointer(out / "checkpoints", keep=t.keep_checkpoints)
        tracker = {"best": -1.0, "since_best": 0, "warned": False}
        start = 0
        if ckpt.latest_step() is not None:
            saved, meta = ckpt.restore(abstract_like(to_checkpoint(self.state)))
            self.state = from_checkpoint(saved, self.state)
            self.batches.restore(meta["data"])
            tracker.update(meta.get("tracker", {}))
            start = int(meta["step"])
            log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
        logger = metrics.MetricsLogger(
            out,
            total_steps=self.total_steps,
            resume_step=start or None,
            console=c.logging.console,
            tensorboard=c.logging.tensorboard,
            wandb=c.logging.wandb,
            wandb_project=c.logging.wandb_project,
            run_config=None,
        )
        hf_cfg = self.model_config.to_hf()
        peak = total_peak_flops(list(self.mesh.devices.flat))
        stop = {"reason": None}
        last: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}

        def emit(step: int, record: dict) -> None:
            logger.log(step, record)
            for cb in callbacks:
                if cb({"step": step, **record}) is True and stop["reason"] is None:
                    stop["reason"] = "callback"

        def save(step: int) -> None:
            meta = {"step": step, "data": self.batches.state(), "tracker": tracker}
            ckpt.save(step, to_checkpoint(self.state), meta)

        def run_eval(step: int) -> None:
            nonlocal last_eval
            ev = self.evaluate()
            if not ev:
                return
            last_eval = ev
            emit(step, ev)
            acc = ev.get("eval/rewards/accuracies", 0.0)
            if round(acc, 4) > OVERFIT_ACCURACY and not tracker["warned"] and set(c.dpo.loss_type) != {"sft"}:
                tracker["warned"] = True
                warnings.warn(
                    f"eval preference accuracy {acc:.2%} at step {step} is above {OVERFIT_ACCURACY:.0%}: "
                    "on real preference data that usually means overfitting (or an easy / leaky eval split)",
                    stacklevel=2,
                )
            if step == 0:
                return
            if acc > tracker["best"]:
                tracker["best"], tracker["since_best"] = acc, 0
            else:
                tracker["since_best"] += 1
            if t.early_stop_accuracy and acc >= t.early_stop_accuracy:
                stop["reason"] = "early_stop"
                log.info(
                    "early stop: eval accuracy %.3f >= %.3f at step %d", acc, t.early_stop_accuracy, step
                )
            elif t.early_stop_patience and tracker["since_best"] >= t.early_stop_patience:
                stop["reason"] = "early_stop"
                log.info("early stop: no eval accuracy improvement in %d evals", t.early_stop_patience)

        sigterm = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: sigterm.set())
        step = start
        if main and c.logging.console:
            print(self.describe(start), flush=True)
        try:
            if start == 0:
                run_eval(0)  # the "before" numbers (policy == reference)
            while step < self.total_steps and stop["reason"] is None:
                t0 = time.perf_counter()  # step time includes building the batch (input-bound runs show it)
                batch, host = self.next_step_batches()
                self.state, m = self.steps.train_step(self.state, batch)
                m = jax.device_get(m)
                step_time = time.perf_counter() - t0
                step += 1
                if not math.isfinite(float(m["loss"])):
                    ckpt.wait()
                    good = ckpt.latest_step()
                    where = (
                        f"checkpoint at step {good} in {ckpt.directory}"
                        if good is not None
                        else "no checkpoint"
                    )
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(m['loss'])}) at step {step}; stopping. Last good: {where}"
                    )
                if step % t.log_every == 0 or step == self.total_steps:
                    stats = [
                        batch_token_stats(b, sliding_window=self.model_config.sliding_window) for b in host
                    ]
                    tokens = sum(s["tokens"] for s in stats) * jax.process_count()
                    keys = sum(s["attended_keys"] for s in stats) * jax.process_count()
                    slots = sum(s["slots"] for s in stats) * jax.process_count()
                    flops = train_flops(
                        hf_cfg,
                        tokens=tokens,
                        attended_keys=keys,
                        reference_forward=c.dpo.reference == "online",
                    )
                    last = {k: float(v) for k, v in m.items() if k != "pairs"}
                    last["epoch"] = step / self.steps_per_epoch
                    last.update(throughput_metrics(
                        step_time=step_time, tokens=tokens, slots=slots, flops=flops, peak_flops=peak
                    ))  # fmt: skip
                    emit(step, last)
                if (t.eval_every and step % t.eval_every == 0) or step == self.total_steps:
                    run_eval(step)
                # Unanimous across processes: a pod's workers may get the signal at different steps.
                if any_process(sigterm.is_set()) and stop["reason"] is None:
                    stop["reason"] = "sigterm"
                if (t.save_every and step % t.save_every == 0) or stop["reason"] is not None:
                    save(step)
            if step > 0:
                save(step)  # the final state (a no-op when this step was just saved)
            ckpt.wait()
        finally:
            ckpt.close()
            logger.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

        final_dir = None
        reason = stop["reason"] or "completed"
        if t.export and reason != "sigterm":
            final_dir = out / "final"
            # Every process takes part in gathering the shards; only process 0 writes.
            save_pretrained(
                nnx.merge(self.graphdef, self.state["params"]), final_dir, tokenizer=self.tokenizer
            )
        return RunResult(
            step=step,
            metrics=last,
            eval_metrics=last_eval,
            output_dir=out,
            final_dir=final_dir,
            metrics_path=out / metrics.METRICS_FILE,
            checkpoint_dir=out / "checkpoints",
            stop_reason=reason,
        )


def run(config: Config, callbacks: Sequence[Callable[[dict], Any]] = (), *, mesh=None) -> RunResult:
    """Train (or resume) the run described by `config`; returns the final metrics and output paths.

    callbacks: called with every logged record (train and eval, with "step"); one returning True stops
    the run after that step (a checkpoint is saved). mesh: overrides `config.mesh` (tests, notebooks).
    """
    return Trainer(config, mesh=mesh).fit(callbacks)
