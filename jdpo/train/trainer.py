"""A DPO run, put together from its parts (data, reference, state, step, checkpoints, export, loop).

    result = jdpo.train.run(config, callbacks=[lambda m: print(m["step"], m.get("loss"))])
    result.final_dir   # <output_dir>/final, a Hugging Face checkpoint of the trained policy

    trainer = jdpo.Trainer(config)            # model, data, reference log-probs, compiled step, state
    trainer.fit(callbacks=[...])              # train (or continue) to the configured number of steps
    trainer.evaluate()                        # eval/ metrics of the current policy on the held-out split
    trainer.generate(["2+2="])                # completions of the current policy
    jdpo.Trainer.from_checkpoint("runs/x")    # a run's newest checkpoint (or runs/x/checkpoints/<step>)
    trainer.close()                           # the output directory's lock, held since Trainer(config)

Set-up reads top to bottom: the output directory's run lock, tokenizer, data (`run_data` / `online`,
before the model loads), model, compiled step functions, resume check, reference (`reference`), initial
state (`state`). The loop (`loop`, `hooks`) and the checkpoints (`resume`) and exports (`export`) are
parts of their own.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import SafetensorError

from jdpo import paths
from jdpo.config import Config, ConfigError, load_config, replace, to_dict
from jdpo.config.context import mesh_advice
from jdpo.data.batch import Batch
from jdpo.errors import ExportError
from jdpo.models import ModelConfig, ModelOptions, from_pretrained, load_tokenizer, lora
from jdpo.parallel.sharding import make_mesh
from jdpo.report import metrics, phases
from jdpo.scoring.forward import PairLogps, over_split, split_metrics
from jdpo.scoring.generate import Generator, SamplingParams
from jdpo.train import compile_cache, diskspace, hub_upload, loop
from jdpo.train import export as exports
from jdpo.train.checkpoint import abstract_like
from jdpo.train.fingerprint import weights_fingerprint
from jdpo.train.guards import BestEval, DivergenceGuard, EarlyStopping
from jdpo.train.hooks import standard_hooks
from jdpo.train.loop import RunResult
from jdpo.train.model_card import ModelCard
from jdpo.train.online import OnlineData
from jdpo.train.reference import Reference, cache_dir_of, initial_reference_params
from jdpo.train.reference_update import UpdateSchedule
from jdpo.train.resume import RunCheckpoints, RunMeta
from jdpo.train.router_loss import moe_settings
from jdpo.train.run_data import (
    OfflineData,
    check_batch_rows,
    decide_balance,
    decide_shared_prompt,
    layout_key,
)
from jdpo.train.runlock import RunLock
from jdpo.train.state import frozen_parts, initial_state
from jdpo.train.step import StepSettings, compiled_steps

__all__ = ["RunResult", "Trainer", "resolve_dtype", "run"]

log = logging.getLogger(__name__)


def resolve_dtype(name: str):
    """'auto' -> bfloat16 on accelerators, float32 on CPU (where bfloat16 matmuls are slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


class Trainer:
    """One run's parts, set up from a Config. `fit()` runs the loop."""

    def __init__(self, config: Config, *, mesh=None):
        self.config = c = config
        if not c.model.path:
            raise ConfigError("model.path is empty: give a Hugging Face checkpoint directory")
        self.mesh = mesh if mesh is not None else _mesh(c)
        try:  # a local path or an object-store URL (gs://bucket/run): every file of the run goes through it
            self.output_dir = paths.as_path(c.train.output_dir)
            paths.check_checkpoint_dir(self.output_dir)  # before the reference pass, not at the first save
        except ValueError as e:  # the message names the path
            raise ConfigError(f"train.output_dir: {e}") from None
        # The lock first, before the output directory is read or anything loads; held until `fit` ends or
        # `close` (and released when this trainer is collected).
        self.run_lock = RunLock(self.output_dir, main_process=jax.process_index() == 0)
        self.run_lock.acquire()
        weakref.finalize(self, self.run_lock.release)
        try:
            self._set_up(c)
        except BaseException:
            self.run_lock.abandon()
            raise

    def _set_up(self, c: Config) -> None:
        phases.reset()  # this run's set-up (the loop logs it before the first step)
        compile_cache.enable(c.train.compile_cache, self.output_dir)  # before anything compiles
        self.dtype = resolve_dtype(c.model.dtype)
        self.best = BestEval(c.train.keep_best) if c.train.keep_best else None
        self.divergence = DivergenceGuard(c.train)
        self.early_stopping = EarlyStopping(c.train, c.dpo.loss_type)
        self.checkpoints = RunCheckpoints(
            self.output_dir,
            keep=c.train.keep_checkpoints,
            best_maximize=None if self.best is None else self.best.maximize,
        )
        hub_upload.check_token(c)  # an upload's token before anything loads, not after the run
        self.hf_model_config = ModelConfig.from_hf(c.model.path)  # a bad config.json, named, first
        self.moe = moe_settings(c, self.hf_model_config)
        with phases.timed("tokenizer"):
            self.tokenizer = _tokenizer(c.model.path)
        # The data before the model: a bad line or an empty split costs seconds, not a model load.
        shared_prompt = decide_shared_prompt(c, self.hf_model_config)
        check_batch_rows(c, self.mesh)
        with phases.timed("data"):
            if c.dpo.online:
                self.data = OnlineData.load(c, self.tokenizer, mesh=self.mesh, shared_prompt=shared_prompt)
            else:  # tokenised once, then from the cache beside the reference cache (`jdpo.train.token_cache`)
                self.data = OfflineData.load(c, self.tokenizer, mesh=self.mesh, shared_prompt=shared_prompt,
                                             cache_dir=cache_dir_of(c, self.output_dir),
                                             balance=decide_balance(c, self.hf_model_config))  # fmt: skip
        with phases.timed("model load"):
            params, base = self._load_model()
        self.settings = StepSettings(
            graphdef=self.graphdef, mesh=self.mesh, abstract_params=_flat(params), loss=c.dpo.loss_spec(),
            reference=c.dpo.reference, ref_update_alpha=c.dpo.ref_update_alpha, optim=c.optim,
            total_steps=self.data.total_steps, abstract_base=None if base is None else _flat(base),
            moe=self.moe,
        )  # fmt: skip
        self.steps = compiled_steps(self.settings)
        self.reference_updates = UpdateSchedule(c.dpo, c.train, self.data.total_steps)
        # Before the reference pass: a refused resume costs no forward pass.
        self.checkpoints.check_resumable(c, self.data.state()["layout"])
        # The weights the run starts from (LoRA: the frozen base), before the first step donates them.
        with phases.timed("weights fingerprint"):
            self.base_fingerprint = weights_fingerprint(params if base is None else base)
        self.checkpoints.check_base(c, self.base_fingerprint)
        self.reference = self._reference()
        # Reference log-probs of the initial weights, before the first step donates them.
        ref_params = initial_reference_params(c, params, lora_run=base is not None, dtype=self.dtype,
                                              model_config=self.model_config, mesh=self.mesh)  # fmt: skip
        # Full fine-tuning from model.path: the reference weights are the base just fingerprinted.
        same = base is None and ref_params is params
        with phases.timed("reference pass"):
            self.reference.prepare(ref_params, base, weights=self.base_fingerprint if same else None)
        with phases.timed("initial state"):  # the optimizer's moments
            self.state = initial_state(self.steps, params, seed=c.train.seed, base=base, dpo=c.dpo,
                                       ref_params=ref_params if c.dpo.reference == "online" else None)  # fmt: skip
        self.frozen = frozen_parts(self.reference_updates.moves and c.dpo.reference == "online")
        self.checkpoints.check_space(self.state, frozen=self.frozen)  # before the first checkpoint write
        self.step = 0  # the last completed optimizer step (a restored checkpoint's)
        self.restored = False
        self.logger: metrics.MetricsLogger | None = None  # while `fit` runs

    # -- set-up ------------------------------------------------------------------------------------

    def _load_model(self):
        """The policy from `model.path`: (trained params, LoRA's frozen base or None), born sharded."""
        m = self.config.model
        options = ModelOptions.from_section(m, dtype=self.dtype, model_config=self.hf_model_config,
                                            context=self.config.mesh.context)  # fmt: skip
        options = lora.model_options(options, self.config.lora, m.path)
        model, self.model_config = from_pretrained(m.path, options=options, mesh=self.mesh)
        # The kernel that runs (model.attention "auto" resolved for this backend and model) and its tile.
        self.attention = (model.options.attention, model.options.attention_block)
        log.info("attention kernel: %s, %d-position tiles (%s)", *self.attention, model.attention_reason)
        self.graphdef, params, base = lora.split(model, self.config.lora)
        return params, base

    def _reference(self) -> Reference:
        d, m = self.config.data, self.config.model
        # Everything the values depend on: which pairs a row holds and the kernel that ran (the kernels
        # agree to float rounding, not bit for bit): the resolved one, so "auto" on a TPU and "splash"
        # share an entry, "auto" on a CPU and on a TPU do not.
        settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                    "dtype": jnp.dtype(self.dtype).name, "param_dtype": m.param_dtype,
                    "attention": self.attention[0], "attention_block": self.attention[1],
                    **layout_key(self.data.layout)}  # fmt: skip
        return Reference(self.config, self.data, self._score, cache_dir=cache_dir_of(self.config, self.output_dir),
                         key_settings=settings, model_config=self.model_config.to_hf(), tokenizer=self.tokenizer,
                         moves=self.reference_updates.moves)  # fmt: skip

    # -- the policy ----------------------------------------------------------------------------------

    def _score(self, pairs, params, base=None) -> PairLogps:
        """Per-pair log-probs of every pair of a split under `params` (LoRA: adapters on `base`)."""
        params = params if base is None else (params, base)
        return over_split(self.steps.forward, params, self.data.one_pass(pairs), len(pairs), mesh=self.mesh)

    def logprobs(self, pairs, params=None) -> PairLogps:
        """Per-pair log-probs of every pair of a split under `params` (default: the current policy)."""
        return self._score(pairs, self.state.params if params is None else params, self.state.base)

    def model(self, params=None):
        """The policy as a model (default: the current parameters; a LoRA run's with its adapters)."""
        params = self.state.params if params is None else params
        return nnx.merge(self.graphdef, params, *(() if self.state.base is None else (self.state.base,)))

    def next_step_batches(self) -> tuple[Batch | None, list[Batch]]:
        """The next step's micro-batches: (device batch [A, B, ...], host batches); (None, []) for a step
        without pairs (online: every prompt tied)."""
        host = self.data.next_host_batches(self.step + 1, self.model)
        if host is None:
            return None, []
        host = self.reference.attach(host)
        return Batch.stack(host).on_mesh(self.mesh, accum=True), host

    def update_reference(self, kind: str) -> None:
        """Move the reference toward the current policy (`jdpo.train.reference.Reference.update`)."""
        self.state = self.reference.update(kind, self.state, self.steps)

    def evaluate(self, params=None) -> dict[str, float]:
        """The loss and TRL's metrics (eval/ names) of the run's loss settings over the whole held-out
        split; {} when there is none."""
        if self.data.eval_pairs is None:
            return {}
        policy = self.logprobs(self.data.eval_pairs, params)
        return split_metrics(policy, self.reference.eval_logps(self.state), self.settings.loss,
                             labels=self.data.eval_pairs.labels, moments=self.state.bco_moments,
                             beta=self.state.beta)  # fmt: skip

    def generate(self, prompts, sampling=None, **kwargs) -> list[dict]:
        """Completions of the current policy for text / message prompts (`Generator.generate`: `sampling`
        a SamplingParams, default greedy; `batch_size`, `max_prompt_length`)."""
        gen = Generator(self.model(), self.tokenizer, mesh=self.mesh, model_dir=self.config.model.path)
        return gen.generate(prompts, sampling or SamplingParams(), **kwargs)

    def lora_params(self) -> int | None:
        """The adapter weights a token runs through in a LoRA run, what its FLOPs count (None: full
        fine-tuning): every adapter, but an MoE layer's per-expert adapters k of E (k experts a token)."""
        if self.state.base is None:
            return None
        c = self.model_config
        total = 0.0
        for path, x in jax.tree_util.tree_leaves_with_path(self.state.params):
            experts = any(getattr(k, "key", None) == "experts" for k in path)
            total += x.size * (c.experts_per_token / c.num_experts if experts else 1)
        return round(total)

    def describe(self, start: int = 0) -> str:
        """A few lines on what this run is about to do (printed at the start of `fit`)."""
        c, d = self.config, self.data
        n_params = sum(x.size for x in jax.tree.leaves(self.state.params))
        params = f"{n_params:,} parameters"
        if self.state.base is not None:
            n_base = sum(x.size for x in jax.tree.leaves(self.state.base))
            params = f"{n_base:,} frozen parameters + {n_params:,} LoRA (rank {c.lora.rank})"
        eval_pairs = len(d.eval_pairs) if d.eval_pairs is not None else 0
        return "\n".join([
            f"jdpo: {self.model_config.family} model, {params}, "
            f"compute {jnp.dtype(self.dtype).name}, mesh {dict(self.mesh.shape)}",
            f"jdpo: {d.describe()}, {eval_pairs:,} eval pairs; rows of {d.layout.row_length} tokens, "
            f"<= {d.layout.max_pairs_per_row} pairs each",
            f"jdpo: loss {'+'.join(c.dpo.loss_type)} (beta {c.dpo.beta}), reference {self.reference.describe()}; "
            f"{d.total_steps} steps of {c.train.batch_rows} rows x {c.train.grad_accum} "
            f"({d.steps_per_epoch:.1f} steps / epoch)" + (f"; resuming at step {start}" if start else ""),
        ])  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> int:
        """Load checkpoint `step` (default: the newest) of this run into the trainer: state, data position,
        reference and the guards' bookkeeping. Returns its step (0: none)."""
        self.state, meta = self.checkpoints.restore(self.state, frozen=self.frozen, step=step)
        if meta is None:
            return 0
        self.data.restore(meta.data)
        self.reference.restore(meta.reference)
        self.early_stopping.restore(meta.tracker)
        self.divergence.restore(meta.divergence)
        if self.best is not None:
            self.best.restore(meta.best or {})
        self.step, self.restored = meta.step, True
        log.info("resumed from %s at step %d", self.checkpoints.directory / str(self.step), self.step)
        return self.step

    def save(self, step: int, metric: float | None = None) -> None:
        """Checkpoint the state, the data position, the guards' bookkeeping and the config at `step`;
        `metric`: this step's `train.keep_best` value when its eval was a new best."""
        meta = RunMeta(step=step, data=self.data.state(), tracker=self.early_stopping.state(),
                       divergence=self.divergence.state(), config=to_dict(self.config),
                       best=None if self.best is None else self.best.state(),
                       reference=self.reference.meta(), base=self._base_meta())  # fmt: skip
        self.checkpoints.save(self.state, meta, frozen=self.frozen, metric=metric)
        if self.logger is not None:
            # On an object store metrics.jsonl is uploaded at sync points: make this one of them, so
            # the file holds every record up to any checkpoint a later run resumes from.
            self.logger.flush()

    def _base_meta(self) -> dict:
        """The base the run trained from and the cached reference it trained against (the resume check)."""
        return {"weights": self.base_fingerprint, "reference_keys": dict(self.reference.keys)}

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, mesh=None) -> Trainer:
        """The trainer of a run, restored: `path` is its output directory (the newest checkpoint) or one
        of its checkpoints (`<output_dir>/checkpoints/<step>`), local or an object-store URL. The config
        is the run's config.yaml, with `train.output_dir` pointing at where the run is now. `fit()`
        continues it."""
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

    # -- the loop and the exports ---------------------------------------------------------------------

    def close(self) -> None:
        """Release the output directory's run lock and the checkpointer (the trainer's views still work;
        `fit` takes the lock again)."""
        self.checkpoints.close()
        self.run_lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fit(self, callbacks: Sequence[Callable[[dict], Any]] = ()) -> RunResult:
        """Train to `total_steps`, resuming from the newest checkpoint in the output directory (or from
        the one `restore` / `from_checkpoint` loaded).

        callbacks: called with every logged record (train and eval, each with its "step"); one returning
        True stops the run after that step (a checkpoint is saved). The output directory's run lock
        (`jdpo.train.runlock`), taken when the trainer was built, is released when fit ends."""
        return loop.fit(self, callbacks, standard_hooks)

    def export(self, params=None, name: str = "final", *, step: int | None = None, best: bool = False):
        """`params` (default: the current policy) as a Hugging Face checkpoint in `<output_dir>/<name>`
        (LoRA: a PEFT adapter directory, and the merged model in `<name>_merged`), with its model card
        (`step`: the step `params` are at, default the current one; `best`: `train.keep_best`'s)."""
        card = ModelCard.of_run(self.config, self.output_dir, self.step if step is None else step, self.best,
                                final_step=self.step)  # fmt: skip
        try:
            return exports.export_model(
                self.model(params), self.output_dir, name, lora_run=self.state.base is not None,
                base_model=self.config.model.path, tokenizer=self.tokenizer, card=card, best=best,
            )  # fmt: skip
        except (OSError, SafetensorError) as e:  # a full disk, a write error: the checkpoint is intact
            why = diskspace.excerpt(e)
            where = f"the checkpoint at step {self.step} in {self.checkpoints.directory} is intact"
            raise ExportError(
                f"the export to {self.output_dir / name} failed ({type(e).__name__}: {why}); {where}: "
                "free space (or fix the cause) and run the same command again, which resumes at that "
                "checkpoint and only exports (from Python: jdpo.Trainer.from_checkpoint(output_dir).export())"
            ) from None

    def export_best(self):
        """The checkpoint of `train.keep_best`'s best eval as `<output_dir>/best` with `best.json`; None
        when no eval after step 0 had a finite value."""
        b = self.best
        if b.step is None:
            log.warning("train.keep_best: no eval after step 0 gave %s a value; no best/ export", b.metric)
            return None
        params = self.state.params
        if b.step != self.step:
            params = self.checkpoints.params_at(self.state, b.step, frozen=self.frozen)
        best_dir = self.export(params, "best", step=b.step, best=True)
        exports.write_best_json(best_dir, b)
        return best_dir


def _mesh(c: Config):
    m = c.mesh
    try:
        return make_mesh(m.data, m.fsdp, m.tensor, expert=m.expert, context=m.context)
    except ValueError as e:
        raise ConfigError(
            f"mesh.data={m.data} mesh.fsdp={m.fsdp} mesh.tensor={m.tensor} mesh.expert={m.expert} "
            f"mesh.context={m.context}: {e}{mesh_advice(m, jax.device_count())}"
        ) from None


def _tokenizer(path: str):
    """The tokenizer of `model.path` (the data needs it before the model is loaded); no custom code."""
    return load_tokenizer(path, what="model.path")


def _flat(tree) -> tuple:
    """`StepSettings`' hashable form of a pytree of arrays: (treedef, abstract leaves with shardings)."""
    abstract = abstract_like(tree)
    return jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract))


def run(config: Config, callbacks: Sequence[Callable[[dict], Any]] = (), *, mesh=None) -> RunResult:
    """Train (or resume) the run described by `config`; returns the final metrics and output paths.

    callbacks: called with every logged record (train and eval, with "step"); one returning True stops
    the run after that step (a checkpoint is saved). mesh: overrides `config.mesh` (tests, notebooks).
    """
    return Trainer(config, mesh=mesh).fit(callbacks)
