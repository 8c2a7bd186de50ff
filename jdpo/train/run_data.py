"""Where a run's batches come from: the splits, the row layout, the step count, a resumable position.

`OfflineData` serves pairs read from files (iterative rounds are passes over them);
`jdpo.train.online.OnlineData` samples its pairs from the policy every step. The loop sees one
interface: `next_host_batches(step, policy)` (this host's micro-batches, or None for a step without
pairs), `state()` / `restore()` (the checkpointed position), `record(step)` (epoch, round) and
`step_metrics(train_time)`, `describe()`. Both are built (`load`) before the model loads, so bad data
costs seconds.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from jdpo import data as jdata
from jdpo.config import Config, ConfigError
from jdpo.data import unpaired as unpaired_data
from jdpo.data.batch import Batch
from jdpo.data.batching import make_batch
from jdpo.data.context_balance import BlockBalance
from jdpo.data.layout import BatchLayout, row_length_for
from jdpo.models.choices import deals_blocks
from jdpo.models.kernels import default_block, resolve_attention, shares_prompt
from jdpo.parallel.sharding import row_shards
from jdpo.train import token_cache
from jdpo.train.token_cache import TokenizedSplits

log = logging.getLogger(__name__)


def check_batch_rows(config: Config, mesh) -> None:
    shards = row_shards(mesh)
    if config.train.batch_rows % shards:
        raise ConfigError(f"train.batch_rows={config.train.batch_rows} must divide over the {shards} row "
                          f"shards of the mesh (data x fsdp = {dict(mesh.shape)})")  # fmt: skip


def _kernel(config: Config, hf_model_config) -> str:
    """The attention kernel the model load will resolve."""
    m = config.model
    C = config.mesh.context
    return resolve_attention(m.attention, hf_model_config, context=C, how=m.context_attention).kernel


def decide_shared_prompt(config: Config, hf_model_config) -> bool:
    """`data.shared_prompt` for the kernel that will run (resolved as the model load will resolve it)."""
    C = config.mesh.context
    kernel = _kernel(config, hf_model_config)
    on, why = shares_prompt(config.data.shared_prompt, kernel, hf_model_config, context=C)
    log.info("shared prompt: %s (%s)", "on" if on else "off", why)
    return on


def decide_balance(config: Config, hf_model_config) -> BlockBalance | None:
    """How rows split over `mesh.context` reach the devices (`model.context_balance`): dealt in blocks
    of the kernel's tile (`jdpo.data.context_balance`), or None: the fixed chunk layout (or no split)."""
    m, C = config.model, config.mesh.context
    kernel = _kernel(config, hf_model_config)
    try:
        dealt = deals_blocks(m.context_balance, kernel, m.context_attention, C)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not dealt:
        return None
    log.info("context balance: rows dealt over mesh.context=%d in blocks of the kernel's tile", C)
    return BlockBalance(C, m.attention_block or default_block(kernel))


def _records(config: Config):
    """(train records, held-out records, what the readers dropped per split)."""
    d, seed = config.data, config.train.seed
    records = jdata.load_preferences(list(d.train), d.format, seed=seed, skip_bad_rows=d.skip_bad_rows)
    dropped = {"train": records.report.dropped, "eval": {}}
    if d.eval:
        held = jdata.load_preferences(list(d.eval), d.format, seed=seed, skip_bad_rows=d.skip_bad_rows)
        dropped["eval"] = held.report.dropped
    elif d.eval_fraction > 0:
        records, held = jdata.split_eval(records, d.eval_fraction, seed=seed)
        if not held:  # 1 / n holds out one record (a fraction rounding to 0.5 records would not)
            n = len(records)
            advice = (f"give data.eval_fraction >= {1 / n:.2g}, or data.eval" if n > 1
                      else f"{n} record cannot be split: give data.eval files")  # fmt: skip
            log.warning("data.eval_fraction=%g of %d train records holds out 0 of them: no eval split (%s)",
                        d.eval_fraction, n, advice)  # fmt: skip
    else:
        held = []
    return records, held, dropped


def tokenized_splits(config: Config, tokenizer) -> TokenizedSplits:
    """Read and tokenise both splits (what the tokenised-data cache holds)."""
    d = config.data
    records, held, dropped = _records(config)
    tokenize = unpaired_data.tokenizer_for(config.dpo, seed=config.train.seed)
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              skip_bad_rows=d.skip_bad_rows, chat_template_kwargs=d.chat_template_kwargs)  # fmt: skip
    train_pairs, train_report = tokenize(records, tokenizer, **kw)
    # data.eval given: its split is checked even when the readers left nothing of it.
    eval_pairs, eval_report = tokenize(held, tokenizer, **kw) if held or d.eval else (None, None)
    dropped = {split: dict(counts) for split, counts in dropped.items()}
    return TokenizedSplits(train_pairs, train_report, eval_pairs, eval_report, dropped)


def eval_source(config: Config) -> str:
    d = config.data
    return f"data.eval ({', '.join(d.eval)})" if d.eval else f"data.eval_fraction={d.eval_fraction}"


def check_keep_best(config: Config, eval_pairs) -> None:
    if config.train.keep_best and eval_pairs is None:
        raise ConfigError(
            f"train.keep_best={config.train.keep_best!r} needs an eval split: give data.eval files or a "
            "data.eval_fraction > 0"
        )


def account(split: str, report, batches, row_length: int, source: str, load_dropped: dict) -> None:
    """Log what a split lost (and raise when nothing is left)."""
    line = jdata.account_split(split, report, too_long=batches.dropped_too_long, row_length=row_length,
                               source=source, load_dropped=load_dropped)  # fmt: skip
    if line:
        log.warning("%s", line)


class OfflineData:
    """Pairs (or rated examples) from files, packed into rows; `train.rounds` passes over them."""

    def __init__(self, config: Config, train_pairs, eval_pairs, layout: BatchLayout):
        self.config, self.train_pairs, self.eval_pairs, self.layout = config, train_pairs, eval_pairs, layout
        self.batches = jdata.PreferenceBatches(train_pairs, layout, seed=config.train.seed)
        t = config.train
        self.steps_per_epoch = self.batches.num_batches(0) / t.grad_accum
        self.total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * self.steps_per_epoch))
        if t.rounds > 1:  # no step mixes two rounds: each round's last step may be part-empty
            self.total_steps = sum(
                math.ceil(self.batches.num_batches(e) / t.grad_accum) for e in range(t.rounds)
            )
        self.round = 1  # the round (1-based) of the last step's batches
        self.tokens_reused = False  # the splits came from the tokenised-data cache

    @classmethod
    def load(
        cls, config: Config, tokenizer, *, mesh, shared_prompt: bool, cache_dir=None, balance=None
    ) -> OfflineData:
        """Records -> (train, eval) -> token ids (from the tokenised-data cache in `cache_dir` when it
        holds them: `jdpo.train.token_cache`) -> the layout, each split accounted for."""
        c, d = config, config.data
        build = lambda: tokenized_splits(c, tokenizer)  # noqa: E731
        if cache_dir is None:
            splits, reused = build(), False
        else:
            splits, reused = token_cache.load_or_build(c, tokenizer, cache_dir, build)
        train_pairs, train_report, eval_pairs, eval_report, dropped = (
            splits.train, splits.train_report, splits.eval, splits.eval_report, splits.dropped)  # fmt: skip
        if c.dpo.unpaired:
            unpaired_data.check_classes(train_pairs.labels, split="train", loss_type=c.dpo.loss_type[0],
                                        desirable_weight=c.dpo.desirable_weight,
                                        undesirable_weight=c.dpo.undesirable_weight,
                                        source=f"data.train ({', '.join(d.train)})")  # fmt: skip
        check_keep_best(c, eval_pairs)
        row_length = row_length_for(d.max_length, d.row_length)
        layout = BatchLayout.for_pairs([p for p in (train_pairs, eval_pairs) if p is not None],
                                       rows_per_batch=c.train.batch_rows, row_length=row_length,
                                       packing=d.packing, shared_prompt=shared_prompt,
                                       balance=balance)  # fmt: skip
        data = cls(c, train_pairs, eval_pairs, layout)
        data.tokens_reused = reused
        account(
            "train",
            train_report,
            data.batches,
            row_length,
            f"data.train ({', '.join(d.train)})",
            dropped["train"],
        )
        if eval_pairs is not None:
            account(
                "eval", eval_report, data.one_pass(eval_pairs), row_length, eval_source(c), dropped["eval"]
            )
        return data

    def one_pass(self, pairs):
        """Every pair of a split once, in order, as this run's training batches lay them out."""
        return jdata.one_pass(pairs, self.layout)

    def reference_splits(self) -> list[tuple[str, Any]]:
        """The splits whose reference log-probs a cached reference holds."""
        return [(s, p) for s, p in (("train", self.train_pairs), ("eval", self.eval_pairs)) if p is not None]

    def next_host_batches(self, step: int, policy) -> list[Batch]:
        """This host's micro-batches of the next step. With `train.rounds` > 1 a step takes no batch of
        the next round: micro-batches past its round's last batch are empty rows (no pair, no loss)."""
        host = []
        for i in range(self.config.train.grad_accum):
            if i > 0 and self.config.train.rounds > 1 and self.round_ended():
                b = self.batches
                empty = [[] for _ in range(b.local_rows)]
                host.append(make_batch(self.train_pairs, empty, b.buckets[0], b.max_pairs_per_row))
            else:
                host.append(next(self.batches))
        self.round = self.batches.epoch + 1
        return host

    def round_ended(self) -> bool:
        """The iterator has given every batch of the current pass (a round of `train.rounds`)."""
        return self.batches.batch >= self.batches.num_batches(self.batches.epoch)

    def state(self) -> dict:
        return self.batches.state()

    def restore(self, state: dict) -> None:
        self.batches.restore(state)
        self.round = self.batches.epoch + 1

    def record(self, step: int) -> dict[str, float]:
        """The epoch (and round) of a logged step."""
        if self.config.train.rounds > 1:  # rounds end on part-empty steps: the epoch is the data position
            b = self.batches
            return {"epoch": b.epoch + b.batch / b.num_batches(b.epoch), "round": self.round}
        return {"epoch": step / self.steps_per_epoch}

    def step_metrics(self, train_time: float) -> dict[str, float]:
        return {}

    def describe(self) -> str:
        return f"{len(self.train_pairs):,} train pairs ({self.batches.dropped_too_long} too long)"


def layout_key(layout: BatchLayout) -> dict[str, Any]:
    """The layout's part of the reference cache key (the shared prompt only when on, so entries of the
    plain layout keep their keys)."""
    out = {
        "row_length": layout.row_length,
        "packing": layout.packing,
        "max_pairs_per_row": layout.max_pairs_per_row,
    }
    return {**out, "shared_prompt": True} if layout.shared_prompt else out
