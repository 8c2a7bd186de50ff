"""DPO training: a run's set-up and the loop around the jitted step (`jdpo.train.step`).

    result = jdpo.train.run(config, callbacks=[lambda m: print(m["step"], m.get("loss"))])
    result.final_dir   # <output_dir>/final, a Hugging Face checkpoint of the trained policy

    trainer = jdpo.Trainer(config)            # model, data, reference log-probs, compiled step, state
    trainer.fit(callbacks=[...])              # train (or continue) to the configured number of steps
    trainer.evaluate()                        # eval/ metrics of the current policy on the held-out split
    trainer.generate(["2+2="])                # completions of the current policy
    jdpo.Trainer.from_checkpoint("runs/x")    # a run's newest checkpoint (or runs/x/checkpoints/<step>)

Set-up reads top to bottom: model and tokenizer, data (records -> token ids -> packed batches), the
compiled step functions, the reference log-probs of the initial weights, the initial state. The loop
asks the policies of `jdpo.train.guards` (cadences, early stop, SIGTERM, non-finite loss) what to do.

Resume: `run` on an output directory with checkpoints continues from the newest one (parameters,
optimizer state, step, data-iterator position, early-stop bookkeeping), and the metrics it logs are
bit-identical to an uninterrupted run's. SIGTERM saves a checkpoint and returns cleanly; a non-finite
loss raises `NonFiniteLossError`, a blow-up (`train.divergence_factor`, `train.max_param_abs`) its subclass
`DivergenceError`, each naming the step and keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jdpo import paths
from jdpo.config import Config, ConfigError
from jdpo.data.batch import Batch
from jdpo.losses.unpaired import running_moments_init
from jdpo.models import lora
from jdpo.models.kernels import resolve_attention, shares_prompt
from jdpo.report import metrics
from jdpo.report.flops import batch_token_stats, throughput_metrics, total_peak_flops, train_flops
from jdpo.scoring.forward import PairLogps, over_split, split_metrics
from jdpo.train import compile_cache, refcache
from jdpo.train.checkpoint import FROZEN, Checkpointer, abstract_like, from_checkpoint, to_checkpoint
from jdpo.train.guards import (
    BestEval,
    DivergenceError,
    DivergenceGuard,
    EarlyStopping,
    NonFiniteLossError,
    Preemption,
    check_finite,
    due,
)
from jdpo.train.reference_update import UpdateSchedule
from jdpo.train.step import BCO_MOMENTS, BETA, STATE_FINITE, StepSettings, compiled_steps

__all__ = [
    "DivergenceError",
    "NonFiniteLossError",
    "RunResult",
    "Trainer",
    "pairs_per_row",
    "resolve_dtype",
    "run",
]

log = logging.getLogger(__name__)

MAX_PAIRS_PER_ROW = 16


@dataclasses.dataclass
class RunResult:
    """What `run` and `Trainer.fit` return."""

    step: int  # the last completed optimizer step
    metrics: dict[str, Any]  # the last logged train metrics
    eval_metrics: dict[str, Any]  # the last eval metrics (eval/ names), {} without an eval split
    # etils.epath paths (`jdpo.paths.as_path`): a local one compares equal to the pathlib.Path of the
    # same string; on an object store they are gs://... URLs.
    output_dir: epath.Path
    final_dir: epath.Path | None  # the Hugging Face export, None when not exported
    best_dir: epath.Path | None  # `train.keep_best`'s export (<output_dir>/best), None without one
    best_step: int | None  # the step best_dir holds
    metrics_path: epath.Path
    checkpoint_dir: epath.Path
    stop_reason: str  # completed | early_stop | sigterm | callback


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
        from jdpo.parallel.sharding import make_mesh

        self.config = c = config
        if not c.model.path:
            raise ConfigError("model.path is empty: give a Hugging Face checkpoint directory")
        try:
            self.mesh = mesh if mesh is not None else make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        except ValueError as e:
            m = c.mesh
            raise ConfigError(f"mesh.data={m.data} mesh.fsdp={m.fsdp} mesh.tensor={m.tensor}: {e}") from None
        try:
            # A local path or an object-store URL (gs://bucket/run): every file of the run goes through it.
            self.output_dir = paths.as_path(c.train.output_dir)
            paths.check_checkpoint_dir(self.output_dir)  # before the reference pass, not at the first save
        except ValueError as e:  # the message names the path
            raise ConfigError(f"train.output_dir: {e}") from None
        compile_cache.enable(c.train.compile_cache, self.output_dir)  # before anything compiles
        self.dtype = resolve_dtype(c.model.dtype)
        self._checkpointer: Checkpointer | None = None
        self.best = BestEval(c.train.keep_best) if c.train.keep_best else None
        self.divergence = DivergenceGuard(c.train)
        # The data before the model: a bad line or an empty split costs seconds, not a model load.
        self.online = None  # dpo.online: the prompts, reward and sampler (`jdpo.train.online.OnlineDPO`)
        self._load_tokenizer()
        self._load_data()
        params = self._load_model()
        abstract = abstract_like(params)
        self.settings = StepSettings(
            graphdef=self.graphdef,
            mesh=self.mesh,
            abstract_params=_flat(abstract),
            loss=c.dpo.loss_spec(),
            reference=c.dpo.reference,
            ref_update_alpha=c.dpo.ref_update_alpha,
            optim=c.optim,
            total_steps=self.total_steps,
            abstract_base=None if self.base is None else _flat(abstract_like(self.base)),
        )
        self.steps = compiled_steps(self.settings)
        self.reference_updates = UpdateSchedule(c.dpo, c.train, self.total_steps)
        self._check_resumable()  # before the reference pass: a refused resume costs no forward pass
        # Reference log-probs of the initial weights, before the first step donates them.
        self._prepare_reference(params)
        self.state = self._initial_state(params)
        self.step = 0  # the last completed optimizer step (a restored checkpoint's)
        self.early_stopping = EarlyStopping(c.train, c.dpo.loss_type)
        self._restored = False
        self._logger: metrics.MetricsLogger | None = None  # while `fit` runs

    # -- set-up ------------------------------------------------------------------------------------

    def _load_tokenizer(self) -> None:
        """The tokenizer of `model.path` (the data needs it before the model is loaded)."""
        from transformers import AutoTokenizer

        from jdpo.models import CheckpointError, ModelConfig

        path = self.config.model.path
        self.hf_model_config = ModelConfig.from_hf(path)  # a missing or unsupported config.json, named, first
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
            why = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"model.path {path}: cannot load its tokenizer ({type(e).__name__}: {why})"
            ) from None

    def _load_model(self):
        """The policy from `model.path`; returns the parameters (born sharded)."""
        from jdpo.models import ModelOptions, from_pretrained

        m = self.config.model
        options = lora.model_options(ModelOptions.from_section(m, dtype=self.dtype), self.config.lora, m.path)
        model, self.model_config = from_pretrained(m.path, options=options, mesh=self.mesh)
        # The kernel that runs (model.attention "auto" resolved for this backend and model) and its tile.
        self.attention = (model.options.attention, model.options.attention_block)
        log.info("attention kernel: %s, %d-position tiles (%s)", *self.attention, model.attention_reason)
        # LoRA: the params are the adapters and self.base the frozen rest (None for full fine-tuning).
        self.graphdef, params, self._base = lora.split(model, self.config.lora)
        return params

    def _load_data(self) -> None:
        """Records -> (train, eval) -> token ids -> the packed train batches, and the step count."""
        from jdpo import data as jdata
        from jdpo.data import unpaired as unpaired_data
        from jdpo.parallel.sharding import row_shards

        c, d = self.config, self.config.data
        # The batch layout follows the kernel that will run (resolved as the model load will resolve it).
        kernel = resolve_attention(c.model.attention, self.hf_model_config).kernel
        self.shared_prompt, why = shares_prompt(d.shared_prompt, kernel, self.hf_model_config)
        log.info("shared prompt: %s (%s)", "on" if self.shared_prompt else "off", why)
        if c.dpo.online:  # prompts to sample from, not pairs
            from jdpo.train.online import load_online_data

            return load_online_data(self)
        records = jdata.load_preferences(
            list(d.train), d.format, seed=c.train.seed, skip_bad_rows=d.skip_bad_rows
        )
        load_dropped = {"train": records.report.dropped, "eval": {}}  # rows the format readers dropped
        if d.eval:
            held = jdata.load_preferences(
                list(d.eval), d.format, seed=c.train.seed, skip_bad_rows=d.skip_bad_rows
            )
            load_dropped["eval"] = held.report.dropped
        elif d.eval_fraction > 0:
            records, held = jdata.split_eval(records, d.eval_fraction, seed=c.train.seed)
            if not held:
                log.warning("data.eval_fraction=%g of %d train records holds out 0 of them: no eval split "
                            "(give data.eval_fraction >= %.2g, or data.eval)", d.eval_fraction, len(records),
                            0.5 / max(len(records), 1))  # fmt: skip
        else:
            held = []
        tok_kw = dict(
            max_length=d.max_length, max_prompt_length=d.max_prompt_length, skip_bad_rows=d.skip_bad_rows
        )
        tokenize = unpaired_data.tokenizer_for(c.dpo, seed=c.train.seed)
        self.train_pairs, self.train_report = tokenize(records, self.tokenizer, **tok_kw)
        self.eval_pairs, eval_report = (
            # data.eval given: its split is checked even when the readers left nothing of it.
            tokenize(held, self.tokenizer, **tok_kw) if held or d.eval else (None, None)
        )
        if c.dpo.unpaired:
            unpaired_data.check_classes(self.train_pairs.labels, split="train", loss_type=c.dpo.loss_type[0],
                                        desirable_weight=c.dpo.desirable_weight,
                                        undesirable_weight=c.dpo.undesirable_weight)  # fmt: skip
        if c.train.keep_best and self.eval_pairs is None:
            raise ConfigError(
                f"train.keep_best={c.train.keep_best!r} needs an eval split: give data.eval files or a "
                "data.eval_fraction > 0"
            )
        self.row_length = d.row_length or 2 * d.max_length
        lengths = [self.train_pairs.pair_lengths(self.shared_prompt)]
        if self.eval_pairs is not None:
            lengths.append(self.eval_pairs.pair_lengths(self.shared_prompt))
        self.max_pairs = pairs_per_row(self.row_length, lengths) if d.packing else 1
        shards = row_shards(self.mesh)
        if c.train.batch_rows % shards:
            raise ConfigError(f"train.batch_rows={c.train.batch_rows} must divide over the {shards} row "
                             f"shards of the mesh (data x fsdp = {dict(self.mesh.shape)})")  # fmt: skip
        self.batch_kw = dict(
            rows_per_batch=c.train.batch_rows,
            row_length=self.row_length,
            max_pairs_per_row=self.max_pairs,
            packing=d.packing,
            shared_prompt=self.shared_prompt,
        )
        self.batches = jdata.PreferenceBatches(self.train_pairs, seed=c.train.seed, **self.batch_kw)
        # Before the model loads: what each split lost, and an error when nothing is left.
        splits = [("train", self.train_report, self.batches, f"data.train ({', '.join(d.train)})")]
        if self.eval_pairs is not None:
            source = f"data.eval ({', '.join(d.eval)})" if d.eval else f"data.eval_fraction={d.eval_fraction}"
            splits.append(("eval", eval_report, self.one_pass(self.eval_pairs), source))
        for split, report, batches, source in splits:
            line = jdata.account_split(
                split,
                report,
                too_long=batches.dropped_too_long,
                row_length=self.row_length,
                source=source,
                load_dropped=load_dropped[split],
            )
            if line:
                log.warning("%s", line)
        self.batches_per_epoch = self.batches.num_batches(0)
        self.steps_per_epoch = self.batches_per_epoch / c.train.grad_accum
        self.total_steps = c.train.max_steps or max(1, math.ceil(c.train.num_epochs * self.steps_per_epoch))
        if c.train.rounds > 1:  # no step mixes two rounds: each round's last step may be part-empty
            A = c.train.grad_accum
            self.total_steps = sum(math.ceil(self.batches.num_batches(e) / A) for e in range(c.train.rounds))
        self.round = 1  # the round (1-based) of the last step's batches

    def _prepare_reference(self, params) -> None:
        """`dpo.reference: cached`: the reference log-probs of both splits (from the on-disk cache when
        its key matches). `online` keeps a frozen copy of the weights in the state instead."""
        self.ref_train = self.ref_eval = None
        self.ref_reused: dict[str, bool] = {}
        self.ref_keys: dict[str, str] = {}
        if self.config.dpo.reference != "cached":
            return
        ref_params = self._reference_params(params)
        self.ref_train = self._reference(ref_params, self.train_pairs, "train")
        if self.eval_pairs is not None:
            self.ref_eval = self._reference(ref_params, self.eval_pairs, "eval")

    def _initial_state(self, params) -> dict:
        state = {
            "params": params,
            "opt_state": self.steps.init_opt(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.config.train.seed)),
        }
        if self.config.dpo.reference == "online":
            state["ref_params"] = self.steps.copy_params(self._reference_params(params))
        if self.config.dpo.running_reward_mean:
            state[BCO_MOMENTS] = running_moments_init()
        if self.config.dpo.beta_schedule == "adaptive":
            state[BETA] = jnp.asarray(self.config.dpo.beta, jnp.float32)
        if self.base is not None:
            state["base"] = self._base
        # Committed to exactly the shardings the step returns: an uncommitted scalar here would make
        # step 2 (whose inputs are step 1's outputs) compile a second time.
        return jax.device_put(state, self.steps.state_shardings)

    @property
    def base(self):
        """A LoRA run's frozen base parameters (None for full fine-tuning): the state's once it exists
        (the step donates and returns it, so the arrays of before the first step are gone)."""
        state = getattr(self, "state", None)
        return self._base if state is None else state.get("base")

    # -- reference ---------------------------------------------------------------------------------

    def _reference_params(self, params):
        """The reference weights: the initial policy, or `dpo.reference_path` when given. LoRA: the
        initial adapters (zero without `lora.init_adapter`: exactly the base), on the frozen base."""
        from jdpo.models import ModelOptions, from_pretrained

        if self.base is not None:
            return params if self.config.lora.init_adapter else lora.zero_like(params)
        path = self.config.dpo.reference_path
        if not path or Path(path).resolve() == Path(self.config.model.path).resolve():
            return params
        # The policy's options: the same parameter dtype and layout (only the parameters are used).
        options = ModelOptions.from_section(self.config.model, dtype=self.dtype)
        ref_model, ref_cfg = from_pretrained(path, options=options, mesh=self.mesh)
        if ref_cfg != self.model_config:
            raise ConfigError(f"dpo.reference_path {path} has another architecture than model.path")
        return nnx.split(ref_model)[1]

    def cache_dir(self) -> epath.Path:
        return paths.as_path(self.config.dpo.cache_dir or (self.output_dir.parent / ".jdpo_refcache"))

    def _reference(self, params, pairs, split: str) -> PairLogps:
        """Per-pair reference log-probs of one split, from the on-disk cache when its key matches."""
        d, m = self.config.data, self.config.model
        # Everything the values depend on: which pairs a row holds (row length, packing, slots per row)
        # and the kernel that ran (the attention kernels agree to float rounding, not bit for bit): the
        # resolved one, so "auto" on a TPU and "splash" share an entry, "auto" on a CPU and on a TPU do not.
        settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "split": split,
                    "dtype": jnp.dtype(self.dtype).name, "param_dtype": m.param_dtype,
                    "row_length": self.row_length, "packing": d.packing, "max_pairs_per_row": self.max_pairs,
                    "attention": self.attention[0], "attention_block": self.attention[1]}  # fmt: skip
        if self.shared_prompt:  # added only when on: the plain layout's keys (cached entries) stay valid
            settings["shared_prompt"] = True
        ref, reused, key = refcache.for_split(
            params if self.base is None else (params, self.base),  # the key covers the adapters too
            pairs,
            expected=self.one_pass(pairs).fits,
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
        if self.base is not None:
            params = (params, self.base)  # adapters on the frozen base
        return over_split(self.steps.forward, params, self.one_pass(pairs), len(pairs), mesh=self.mesh)

    def model(self, params=None):
        """The policy as a model (default: the current parameters; a LoRA run's with its adapters)."""
        params = self.state["params"] if params is None else params
        return nnx.merge(self.graphdef, params, *(() if self.base is None else (self.base,)))

    def next_step_batches(self) -> tuple[Batch, list[Batch]]:
        """The next optimizer step's micro-batches: (device batch [A, B, ...], host batches). Online: the
        pairs sampled from the current policy, or (None, []) when every prompt tied (no update). With
        `train.rounds` > 1 a step takes no batch of the next round: micro-batches past its round's last
        batch are empty rows (no pair, no loss, no gradient)."""
        if self.online is not None:
            return self.online.next_step(self)
        from jdpo.data.batching import make_batch

        host = []
        for i in range(self.config.train.grad_accum):
            if i > 0 and self.config.train.rounds > 1 and self.round_ended():
                b = self.batches
                empty = [[] for _ in range(b.local_rows)]
                host.append(make_batch(self.train_pairs, empty, b.buckets[0], b.max_pairs_per_row))
            else:
                host.append(next(self.batches))
        self.round = self.batches.epoch + 1
        if self.config.dpo.reference == "cached":
            host = [self.ref_train.attach(b) for b in host]
        return Batch.stack(host).on_mesh(self.mesh, accum=True), host

    def round_ended(self) -> bool:
        """The data iterator has given every batch of the current pass (a round of `train.rounds`)."""
        return self.batches.batch >= self.batches.num_batches(self.batches.epoch)

    # -- the moving reference (`jdpo.train.reference_update`) ------------------------------------------------

    def update_reference(self, kind: str) -> None:
        """Move the reference toward the current policy ("hard": to it; "soft": TR-DPO's mix). Online: the
        state's ref_params, on the device; cached (hard only): both splits' caches recomputed from the
        current weights, under their new keys."""
        if self.config.dpo.reference == "online":
            ref = self.steps.update_reference[kind](self.state["ref_params"], self.state["params"])
            self.state = dict(self.state, ref_params=ref)
            self.ref_eval = None  # the eval split's reference log-probs change with it
            return
        if kind != "hard":  # config.validate refuses soft + cached
            raise ValueError(f"a {kind} update of a cached reference")
        params = self.state["params"]
        self.ref_train = self._reference(params, self.train_pairs, "train")
        if self.eval_pairs is not None:
            self.ref_eval = self._reference(params, self.eval_pairs, "eval")

    @property
    def _frozen(self) -> tuple[str, ...]:
        """The state's parts a checkpoint leaves out: a reference that moves is saved."""
        if self.reference_updates.moves and self.config.dpo.reference == "online":
            return tuple(k for k in FROZEN if k != "ref_params")
        return FROZEN

    def _restore_cached_reference(self, keys: dict[str, str]) -> None:
        """A resumed run whose cached reference was updated: the entries the checkpoint names, by key."""
        from jdpo.models import CheckpointError
        from jdpo.parallel.distributed import any_process

        for split, pairs in (("train", self.train_pairs), ("eval", self.eval_pairs)):
            key = keys.get(split)
            if pairs is None or key is None or key == self.ref_keys.get(split):
                continue
            where = self.cache_dir() / key
            ref, problem = refcache.load_entry(where, len(pairs), self.one_pass(pairs).fits)
            if any_process(ref is None):
                raise CheckpointError(
                    f"the checkpoint's reference for the {split} split is the cache entry {where} (made at a "
                    f"reference update from weights no longer kept), which is {problem or 'missing'}: put "
                    "the cache back (dpo.cache_dir), or start again in another train.output_dir"
                )
            self.ref_keys[split], self.ref_reused[split] = key, True
            if split == "train":
                self.ref_train = ref
            else:
                self.ref_eval = ref

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, params=None) -> dict[str, float]:
        """The loss and TRL's metrics (eval/ names) of the run's loss settings over the whole held-out
        split; {} when there is none."""
        if self.eval_pairs is None:
            return {}
        policy = self.logprobs(self.eval_pairs, params)
        if self.config.dpo.reference == "online" and self.ref_eval is None:
            # Between reference updates the online reference is frozen: its eval log-probs are the same.
            self.ref_eval = self.logprobs(self.eval_pairs, self.state["ref_params"])
        return split_metrics(policy, self.ref_eval, self.settings.loss, labels=self.eval_pairs.labels,
                             moments=self.state.get(BCO_MOMENTS), beta=self.state.get(BETA))  # fmt: skip

    def lora_params(self) -> int | None:
        """The number of trained adapter weights of a LoRA run (None: full fine-tuning)."""
        if self.base is None:
            return None
        return sum(x.size for x in jax.tree.leaves(self.state["params"]))

    def describe(self, start: int = 0) -> str:
        """A few lines on what this run is about to do (printed at the start of `fit`)."""
        c = self.config
        n_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        params = f"{n_params:,} parameters"
        if self.base is not None:
            n_base = sum(x.size for x in jax.tree.leaves(self.base))
            params = f"{n_base:,} frozen parameters + {n_params:,} LoRA (rank {c.lora.rank})"
        ref = c.dpo.reference + "".join(
            f", {k} {'reused' if v else 'computed'}" for k, v in self.ref_reused.items()
        )
        eval_pairs = len(self.eval_pairs) if self.eval_pairs is not None else 0
        if c.dpo.ref_update != "none":
            alpha = f" (alpha {c.dpo.ref_update_alpha})" if c.dpo.ref_update == "soft" else ""
            ref += f", {c.dpo.ref_update} update{alpha} every {c.dpo.ref_update_every} steps"
        if c.train.rounds > 1:
            ref += f", {c.train.rounds} rounds (the policy the next round's reference)"
        if c.dpo.beta_schedule == "adaptive":
            ref += f", adaptive beta (target KL {c.dpo.target_kl})"
        train = (
            self.online.describe()
            if self.online is not None
            else f"{len(self.train_pairs):,} train pairs ({self.batches.dropped_too_long} too long)"
        )
        return "\n".join([
            f"jdpo: {self.model_config.family} model, {params}, "
            f"compute {jnp.dtype(self.dtype).name}, mesh {dict(self.mesh.shape)}",
            f"jdpo: {train}, {eval_pairs:,} eval pairs; rows of {self.row_length} tokens, "
            f"<= {self.max_pairs} pairs each",
            f"jdpo: loss {'+'.join(c.dpo.loss_type)} (beta {c.dpo.beta}), reference {ref}; "
            f"{self.total_steps} steps of {c.train.batch_rows} rows x {c.train.grad_accum} "
            f"({self.steps_per_epoch:.1f} steps / epoch)" + (f"; resuming at step {start}" if start else ""),
        ])  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> epath.Path:
        return self.output_dir / "checkpoints"

    def _checkpoints(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(
                self.checkpoint_dir,
                keep=self.config.train.keep_checkpoints,
                best=None if self.best is None else self.best.maximize,
            )
        return self._checkpointer

    def restore(self, step: int | None = None) -> int:
        """Load checkpoint `step` (default: the newest) of this run into the trainer: parameters,
        optimizer state, data position and early-stop bookkeeping. Returns its step (0: none)."""
        ckpt = self._checkpoints()
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            return 0
        if step not in ckpt.steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory}; have {ckpt.steps()}")
        saved, meta, skipped = ckpt.restore_intact(
            abstract_like(to_checkpoint(self.state, self._frozen)), step
        )
        for bad, why in skipped:
            log.warning("checkpoint at step %d is damaged: %s; moved aside to %s.damaged/, resuming from "
                        "step %d", bad, why, ckpt.directory, meta["step"])  # fmt: skip
        self.state = from_checkpoint(saved, self.state, self._frozen)
        self.batches.restore(meta["data"])
        if self.config.dpo.reference == "online":
            self.ref_eval = None  # of the restored reference, computed at the next eval
        elif "reference" in meta:
            self._restore_cached_reference(meta["reference"]["keys"])
        self.round = self.batches.epoch + 1
        self.early_stopping.restore(meta.get("tracker", {}))
        self.divergence.restore(meta.get("divergence", {}))
        if self.best is not None:
            self.best.restore(meta.get("best", {}))
        self.step, self._restored = int(meta["step"]), True
        log.info("resumed from %s at step %d", ckpt.directory / str(self.step), self.step)
        return self.step

    def save(self, step: int, metric: float | None = None) -> None:
        """Checkpoint the state, the data position, the guards' bookkeeping and the config at `step`;
        `metric`: this step's `train.keep_best` value when its eval was a new best."""
        from jdpo.config import to_dict

        meta = {"step": step, "data": self.batches.state(), "tracker": self.early_stopping.state(),
                "divergence": self.divergence.state(), "config": to_dict(self.config)}  # fmt: skip
        if self.best is not None:
            meta["best"] = self.best.state()
        if self.reference_updates.moves and self.config.dpo.reference == "cached":
            meta["reference"] = {"keys": dict(self.ref_keys)}  # the cache entries a resume loads by key
        self._checkpoints().save(step, to_checkpoint(self.state, self._frozen), meta, metric=metric)
        if self._logger is not None:
            # On an object store metrics.jsonl is uploaded at sync points: make this one of them, so
            # the file holds every record up to any checkpoint a later run resumes from.
            self._logger.flush()

    def _check_resumable(self) -> None:
        """When the output directory has checkpoints, refuse (before any forward pass) a config whose
        optimisation settings differ from the newest checkpoint's, unless `train.allow_config_change`,
        and data or batch settings the saved data position does not belong to."""
        from jdpo.config import RESUMABLE_CHANGES, config_changes

        if not self.checkpoint_dir.exists() or self._checkpoints().latest_step() is None:
            return
        meta = None
        for step in reversed(self._checkpoints().steps()):  # a damaged newest one is skipped on restore
            try:
                meta = self._checkpoints().meta(step)
                break
            except Exception as e:  # orbax raises many kinds for missing or truncated files
                log.warning("checkpoint at step %d: metadata unreadable (%s)", step, type(e).__name__)
        if meta is None:
            return
        where = f"{self.checkpoint_dir / str(meta['step'])}"
        changed = [
            c for c in config_changes(meta.get("config", {}), self.config) if c[0] not in RESUMABLE_CHANGES
        ]
        if changed and not self.config.train.allow_config_change:
            diff = "\n".join(f"  {name}: {old!r} -> {new!r}" for name, old, new in changed)
            raise ConfigError(
                f"{self.output_dir} holds a run whose settings differ from this config ({where}):\n"
                f"{diff}\nResume with the run's settings, give another train.output_dir, or pass "
                "--train.allow_config_change true to continue with the new ones"
            )
        if meta["data"]["layout"] != self.batches.state()["layout"]:
            raise ConfigError(
                f"the data or batch settings differ from those of checkpoint {where} (its data position "
                "belongs to other pairs, another seed or other batch settings): resume with the run's "
                "data, or give another train.output_dir"
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, mesh=None) -> Trainer:
        """The trainer of a run, restored: `path` is its output directory (the newest checkpoint) or one
        of its checkpoints (`<output_dir>/checkpoints/<step>`), local or an object-store URL. The config
        is the run's config.yaml, with `train.output_dir` pointing at where the run is now. `fit()`
        continues it."""
        from jdpo.config import load_config, replace

        path = paths.as_path(path)
        step = None
        if path.parent.name == "checkpoints" and path.name.isdigit():
            path, step = path.parent.parent, int(path.name)
        if not (path / "config.yaml").exists():
            raise FileNotFoundError(
                f"{path} is neither a run's output directory (with config.yaml) nor one of its "
                "checkpoints (<output_dir>/checkpoints/<step>)"
            )
        config = replace(load_config(path / "config.yaml"), **{"train.output_dir": str(path)})
        trainer = cls(config, mesh=mesh)
        if trainer.restore(step) == 0 and step is None:
            log.warning("%s has no checkpoint yet: the trainer starts at step 0", path)
        return trainer

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, prompts, sampling=None, **kwargs) -> list[dict]:
        """Completions of the current policy for text / message prompts (`jdpo.scoring.generate.Generator.generate`:
        `sampling` a SamplingParams, default greedy; `batch_size`, `max_prompt_length`)."""
        from jdpo.scoring.generate import Generator, SamplingParams

        model = self.model()
        gen = Generator(model, self.tokenizer, mesh=self.mesh, model_dir=self.config.model.path)
        return gen.generate(prompts, sampling or SamplingParams(), **kwargs)

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self, callbacks: Sequence[Callable[[dict], Any]] = ()) -> RunResult:
        """Train to `total_steps`, resuming from the newest checkpoint in the output directory (or from
        the one `restore` / `from_checkpoint` loaded).

        callbacks: called with every logged record (train and eval, each with its "step"); one returning
        True stops the run after that step (a checkpoint is saved). The output directory is locked for
        the run's life (`jdpo.train.runlock`): a second run on it refuses to start."""
        from jdpo.train.runlock import RunLock

        with RunLock(self.output_dir, main_process=jax.process_index() == 0):
            return self._fit(callbacks)

    def _fit(self, callbacks: Sequence[Callable[[dict], Any]]) -> RunResult:
        c, t = self.config, self.config.train
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self._checkpoints()
        start = self.step if self._restored else self.restore()
        if jax.process_index() == 0:
            self._keep_config(start)
        newest = ckpt.latest_step()
        if newest is not None and newest > start:
            raise ValueError(
                f"the trainer is at step {start} but {ckpt.directory} has checkpoints up to step {newest}: "
                "continuing would overwrite them; continue from the newest (Trainer.from_checkpoint on the "
                "output directory) or copy the run to a new output directory first"
            )
        logger = metrics.MetricsLogger(
            self.output_dir,
            total_steps=self.total_steps,
            resume_step=start or None,
            console=c.logging.console,
            tensorboard=c.logging.tensorboard,
            wandb=c.logging.wandb,
            wandb_project=c.logging.wandb_project,
            run_config=None,
        )
        self._logger = logger
        self._last, self._last_eval, self._stop, self._new_best = {}, {}, None, None

        def emit(step: int, record: dict) -> None:
            logger.log(step, record)
            for cb in callbacks:
                if cb({"step": step, **record}) is True and self._stop is None:
                    self._stop = "callback"

        def run_eval(step: int) -> None:
            ev = self.evaluate()
            if ev:
                self._last_eval = ev
                emit(step, ev)
                if self.best is not None:
                    self._new_best = self.best.observe(step, ev)
                if self.early_stopping.observe(step, ev) and self._stop is None:
                    self._stop = "early_stop"

        # Constant over the run: computed once, not at every logged step (on CPU the peak is measured).
        hf_config, peak = self.model_config.to_hf(), total_peak_flops(list(self.mesh.devices.flat))
        step = start
        if jax.process_index() == 0 and c.logging.console:
            print(self.describe(start), flush=True)
        try:
            with Preemption() as preemption:
                if start == 0:
                    run_eval(0)  # the "before" numbers (policy == reference)
                while step < self.total_steps and self._stop is None:
                    t0 = (
                        time.perf_counter()
                    )  # step time includes building the batch (input-bound runs show it)
                    batch, host = self.next_step_batches()
                    t1 = time.perf_counter()
                    m = {}
                    if batch is not None:  # None: an online step whose prompts all tied, no update
                        self.state, m = self.steps.train_step(self.state, batch)
                        m = jax.device_get(m)
                    step_time = time.perf_counter() - t0
                    step = self.step = step + 1
                    if batch is not None:
                        check_finite(float(m["loss"]), bool(m.pop(STATE_FINITE)), step, ckpt)
                        self.divergence.check(step, m, ckpt)
                    if self.online is not None:  # the step's sampling metrics and its time split
                        m = {**m, **self.online.last, "online/train_time": time.perf_counter() - t1}
                    if due(t.log_every, step, self.total_steps):
                        self._last = self._train_record(step, m, host, step_time, hf_config, peak)
                        emit(step, self._last)
                    if due(t.eval_every, step, self.total_steps):
                        run_eval(step)  # of the reference this step trained against
                    update = self.reference_updates.after(step, t.rounds > 1 and self.round_ended())
                    if update is not None:  # before the checkpoint, which holds (or names) the new one
                        self.update_reference(update)
                    if preemption.requested() and self._stop is None:
                        self._stop = "sigterm"
                    best, self._new_best = self._new_best, None
                    if (
                        due(t.save_every, step, self.total_steps)
                        or self._stop is not None
                        or best is not None
                    ):
                        self.save(step, metric=best)
                if step > start:
                    self.save(step)  # the final state (a no-op when this step was just saved)
                ckpt.wait()
        finally:
            ckpt.close()
            self._checkpointer = None
            self._logger = None
            logger.close()
        reason = self._stop or "completed"
        exporting = t.export and reason != "sigterm"
        final_dir = self.export() if exporting else None
        best_dir = self.export_best() if exporting and self.best is not None else None
        return RunResult(
            step=step,
            metrics=self._last,
            eval_metrics=self._last_eval,
            output_dir=self.output_dir,
            final_dir=final_dir,
            best_dir=best_dir,
            best_step=None if best_dir is None else self.best.step,
            metrics_path=self.output_dir / metrics.METRICS_FILE,
            checkpoint_dir=self.checkpoint_dir,
            stop_reason=reason,
        )

    def _keep_config(self, start: int) -> None:
        """config.yaml is the config the run was started with; a resume with another config (only
        what `train.allow_config_change` or RESUMABLE_CHANGES admit gets here) adds config.<step>.yaml."""
        from jdpo.config import config_changes, dump, load_config, to_dict

        first = self.output_dir / "config.yaml"
        if start == 0 or not first.exists():
            dump(self.config, first)
        elif config_changes(to_dict(load_config(first)), self.config):
            dump(self.config, self.output_dir / f"config.{start}.yaml")

    def _train_record(
        self, step: int, m: dict, host: list[Batch], step_time: float, hf_config: dict, peak: float | None
    ) -> dict[str, float]:
        """One logged train record: the step's metrics, its epoch, and throughput over all processes
        (`hf_config`: the model's HF config for the FLOP count; `peak`: the mesh's peak FLOP/s)."""
        from jdpo.parallel.distributed import sum_over_processes

        stats = [batch_token_stats(b, sliding_window=self.model_config.sliding_window) for b in host]
        # Each process counts its own rows; summed, the counters are the global batch's.
        tokens, keys, slots = (
            int(x)
            for x in sum_over_processes(
                [sum(s[k] for s in stats) for k in ("tokens", "attended_keys", "slots")]
            )
        )
        flops = train_flops(
            hf_config,
            tokens=tokens,
            attended_keys=keys,
            reference_forward=self.config.dpo.reference == "online",
            lora_params=self.lora_params(),
        )
        record = {k: float(v) for k, v in m.items() if k != "pairs"}
        record["epoch"] = step / self.steps_per_epoch
        if self.config.train.rounds > 1:  # rounds end on part-empty steps: the epoch is the data position
            b = self.batches
            record["epoch"] = b.epoch + b.batch / b.num_batches(b.epoch)
            record["round"] = self.round
        record.update(
            throughput_metrics(step_time=step_time, tokens=tokens, slots=slots, flops=flops, peak_flops=peak)
        )
        return record

    def export(self, params=None, name: str = "final") -> epath.Path:
        """`params` (default: the current policy) as a Hugging Face checkpoint in `<output_dir>/<name>`.
        Every process takes part in gathering the shards; only process 0 writes."""
        from jdpo.models import save_pretrained

        final_dir = self.output_dir / name
        model = self.model(params)
        if self.base is not None:  # LoRA: a PEFT adapter directory, and the merged model beside it
            merged_dir = self.output_dir / f"{name}_merged"
            return lora_export(model, final_dir, merged_dir, self.config.model.path, self.tokenizer)
        # safetensors' save_file and tokenizer.save_pretrained write local files only: on an object store
        # the export is written to a local temporary directory, then copied over file by file (process 0;
        # the weight shards of an earlier export that this one does not overwrite are then deleted, as
        # save_pretrained does locally). Readers may see a half-copied final/ while that runs.
        with paths.staged_dir(final_dir, upload=jax.process_index() == 0, prune=_is_weight_file) as local:
            save_pretrained(model, local, tokenizer=self.tokenizer)
        return final_dir

    def export_best(self) -> epath.Path | None:
        """The checkpoint of `train.keep_best`'s best eval as a Hugging Face checkpoint in
        `<output_dir>/best`, with `best.json` saying which step and value it is; None when no eval after
        step 0 had a finite value."""
        import json

        b = self.best
        if b.step is None:
            log.warning("train.keep_best: no eval after step 0 gave %s a value; no best/ export", b.metric)
            return None
        if b.step == self.step:
            params = self.state["params"]
        else:
            ckpt = self._checkpoints()
            try:
                saved, _ = ckpt.restore(abstract_like(to_checkpoint(self.state, self._frozen)), b.step)
            finally:
                ckpt.close()
                self._checkpointer = None
            params = from_checkpoint(saved, self.state, self._frozen)["params"]
        best_dir = self.export(params, "best")
        if jax.process_index() == 0:
            (best_dir / "best.json").write_text(
                json.dumps({"step": b.step, "metric": b.metric, "value": b.value})
            )
        log.info("best/: the policy at step %d (%s = %.6g)", b.step, b.metric, b.value)
        return best_dir


def lora_export(model, final_dir, merged_dir, base_model: str, tokenizer) -> epath.Path:
    """A LoRA run's export: `final_dir` the PEFT adapter directory, `merged_dir` the Hugging Face
    checkpoint with the adapters merged into the base. Returns `final_dir`."""
    from jdpo.models import save_pretrained
    from jdpo.models.peft import save_adapter

    main = jax.process_index() == 0
    with paths.staged_dir(final_dir, upload=main) as local:
        save_adapter(model, local, base_model=base_model)
        tokenizer.save_pretrained(local)
    with paths.staged_dir(merged_dir, upload=main, prune=_is_weight_file) as local:
        save_pretrained(lora.merged(model), local, tokenizer=tokenizer)
    return final_dir


def _flat(tree) -> tuple:
    return jax.tree.structure(tree), tuple(jax.tree.leaves(tree))


def _is_weight_file(name: str) -> bool:
    """An exported weight file (`model.safetensors`, `model-00001-of-00002.safetensors`, the index)."""
    return re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name) is not None


def run(config: Config, callbacks: Sequence[Callable[[dict], Any]] = (), *, mesh=None) -> RunResult:
    """Train (or resume) the run described by `config`; returns the final metrics and output paths.

    callbacks: called with every logged record (train and eval, with "step"); one returning True stops
    the run after that step (a checkpoint is saved). mesh: overrides `config.mesh` (tests, notebooks).
    """
    return Trainer(config, mesh=mesh).fit(callbacks)
