"""The run's reference, one object: its mode, cache keys, reference passes, updates and resume.

- `cached` (default): per-pair log-probs of both splits computed once from the reference weights
  (`jdpo.train.refcache`, keyed by everything they depend on) and attached to each host batch; a hard
  update recomputes them from the current weights under new keys, which a checkpoint's meta names.
- `online`: the weights live in the state (`TrainState.ref_params`) and the step scores with them;
  the eval split's log-probs are computed when first needed and kept until the next update.
- `none`: reference-free losses.
LoRA: the reference is the frozen base with the initial adapters (zero: exactly the base).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from jdpo import paths
from jdpo.config import Config, ConfigError
from jdpo.data.batch import Batch
from jdpo.models import CheckpointError, ModelOptions, from_pretrained, lora
from jdpo.parallel.distributed import any_process
from jdpo.scoring.forward import PairLogps
from jdpo.train import refcache
from jdpo.train.fingerprint import weights_fingerprint
from jdpo.train.state import TrainState

log = logging.getLogger(__name__)


def initial_reference_params(config: Config, params, *, lora_run: bool, model_config, dtype, mesh):
    """The reference weights: the initial policy, or `dpo.reference_path` when given. LoRA: the
    initial adapters (zero without `lora.init_adapter`: exactly the base), on the frozen base."""
    if lora_run:
        return params if config.lora.init_adapter else lora.zero_like(params)
    path = config.dpo.reference_path
    if not path or Path(path).resolve() == Path(config.model.path).resolve():
        return params
    # The policy's options: the same parameter dtype and layout (only the parameters are used).
    options = ModelOptions.from_section(config.model, dtype=dtype, model_config=model_config,
                                        context=config.mesh.context)  # fmt: skip
    ref_model, ref_cfg = from_pretrained(path, options=options, mesh=mesh)
    if ref_cfg != model_config:
        raise ConfigError(f"dpo.reference_path {path} has another architecture than model.path")
    return nnx.split(ref_model)[1]


class Reference:
    """`score(pairs, params, base)` is the run's forward over a split (`jdpo.scoring.forward.over_split`);
    `key_settings` everything else the cached values depend on (lengths, dtypes, layout, kernel)."""

    def __init__(self, config: Config, data, score: Callable, *, cache_dir, key_settings: dict,
                 model_config: dict, tokenizer, moves: bool):  # fmt: skip
        self.mode = config.dpo.reference
        self.config, self.data, self.score = config, data, score
        self.cache_dir = paths.as_path(cache_dir)
        self.key_settings, self.model_config, self.tokenizer = key_settings, model_config, tokenizer
        self.moves = moves  # the schedule updates it during the run (`jdpo.train.reference_update`)
        self.logps: dict[str, PairLogps] = {}  # split -> per-pair reference log-probs
        self.keys: dict[str, str] = {}  # split -> cache key (cached)
        self.reused: dict[str, bool] = {}  # split -> found in the cache

    @property
    def train(self) -> PairLogps | None:
        return self.logps.get("train")

    @property
    def eval(self) -> PairLogps | None:
        return self.logps.get("eval")

    def prepare(self, ref_params, base, weights: str | None = None) -> None:
        """The cached reference's log-probs of every split, from the cache when its key matches.
        `weights`: the fingerprint of `ref_params` when the caller has it (the run's base check does)."""
        if self.mode == "cached":
            self._cache_all(ref_params, base, weights)

    def _cache_all(self, params, base, weights: str | None = None) -> None:
        if weights is None:  # once for every split; the key covers a LoRA run's adapters too
            weights = weights_fingerprint(params if base is None else (params, base))
        for split, pairs in self.data.reference_splits():
            settings = {**self.key_settings, "split": split}
            ref, reused, key = refcache.for_split(
                weights,
                pairs,
                expected=self.data.one_pass(pairs).fits,
                compute=lambda pairs=pairs: self.score(pairs, params, base),
                cache_dir=self.cache_dir,
                model_config=self.model_config,
                tokenizer=self.tokenizer,
                settings=settings,
            )
            self.logps[split], self.reused[split], self.keys[split] = ref, reused, key

    def attach(self, host: list[Batch]) -> list[Batch]:
        """The cached reference log-probs of each slot, attached to this host's batches."""
        return [self.train.attach(b) for b in host] if self.mode == "cached" else host

    def eval_logps(self, state: TrainState) -> PairLogps | None:
        """The eval split's reference log-probs (online: computed once per reference, then kept)."""
        if self.mode == "online" and "eval" not in self.logps and self.data.eval_pairs is not None:
            self.logps["eval"] = self.score(self.data.eval_pairs, state.ref_params, state.base)
        return self.eval

    def update(self, kind: str, state: TrainState, steps) -> TrainState:
        """Move the reference toward the current policy ("hard": to it; "soft": TR-DPO's mix). Online: the
        state's ref_params, on the device; cached (hard only): every split recomputed from the current
        weights, under their new keys."""
        if self.mode == "online":
            self.logps.pop("eval", None)  # the eval split's reference log-probs change with it
            return state.replace(ref_params=steps.update_reference[kind](state.ref_params, state.params))
        if kind != "hard":  # config.validate refuses soft + cached
            raise ValueError(f"a {kind} update of a cached reference")
        self._cache_all(state.params, state.base)
        return state

    def meta(self) -> dict | None:
        """What a checkpoint records: the cache entries of a cached reference that moved, by key."""
        return {"keys": dict(self.keys)} if self.moves and self.mode == "cached" else None

    def restore(self, meta: dict | None) -> None:
        """After a checkpoint restore: online, the eval log-probs of the restored reference come at the
        next eval; cached and moved, the entries the checkpoint names are loaded by key."""
        if self.mode == "online":
            self.logps.pop("eval", None)
        elif meta is not None:
            self._restore_keys(meta["keys"])

    def _restore_keys(self, keys: dict[str, str]) -> None:
        for split, pairs in self.data.reference_splits():
            key = keys.get(split)
            if key is None or key == self.keys.get(split):
                continue
            where = self.cache_dir / key
            ref, problem = refcache.load_entry(where, len(pairs), self.data.one_pass(pairs).fits)
            if any_process(ref is None):
                raise CheckpointError(
                    f"the checkpoint's reference for the {split} split is the cache entry {where} (made at a "
                    f"reference update from weights no longer kept), which is {problem or 'missing'}: put "
                    "the cache back (dpo.cache_dir), or start again in another train.output_dir"
                )
            self.logps[split], self.keys[split], self.reused[split] = ref, key, True

    def describe(self) -> str:
        c = self.config
        out = self.mode + "".join(f", {k} {'reused' if v else 'computed'}" for k, v in self.reused.items())
        if c.dpo.ref_update != "none":
            alpha = f" (alpha {c.dpo.ref_update_alpha})" if c.dpo.ref_update == "soft" else ""
            out += f", {c.dpo.ref_update} update{alpha} every {c.dpo.ref_update_every} steps"
        if c.train.rounds > 1:
            out += f", {c.train.rounds} rounds (the policy the next round's reference)"
        if c.dpo.beta_schedule == "adaptive":
            out += f", adaptive beta (target KL {c.dpo.target_kl})"
        return out


def cache_dir_of(config: Config, output_dir) -> Any:
    return paths.as_path(config.dpo.cache_dir or (output_dir.parent / ".jdpo_refcache"))
