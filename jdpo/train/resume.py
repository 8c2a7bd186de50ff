"""A run's checkpoints and its resume: save, restore, the compatibility check, the kept config files.

`RunMeta` is the typed `meta` item of a checkpoint (the orbax layer is `jdpo.train.checkpoint`):
the step, the data position, the guards' bookkeeping, the run's config and, for a cached reference
that moved, the cache entries it trained against. One object reads it for the resume check, the
restore and the best export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

from etils import epath

from jdpo.config import RESUMABLE_CHANGES, Config, ConfigError, config_changes, dump, load_config, to_dict
from jdpo.errors import NoSpaceError
from jdpo.parallel.distributed import any_process, is_main_process
from jdpo.train import diskspace
from jdpo.train.checkpoint import Checkpointer
from jdpo.train.state import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunMeta:
    step: int
    data: dict  # the data iterator's position (with its layout hash)
    tracker: dict  # early stopping
    divergence: dict  # the divergence guard's history
    config: dict  # the run's config (`jdpo.config.to_dict`)
    best: dict | None = None  # train.keep_best's bookkeeping
    reference: dict | None = None  # {"keys": {split: cache key}}: a cached reference that moved
    # {"weights": fingerprint of the weights at model.path, "reference_keys": {split: cache key}}: the
    # base the run trained from and the cached reference it trained against (None: an older jdpo's)
    base: dict | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunMeta:
        return cls(step=int(d["step"]), data=d["data"], tracker=d.get("tracker", {}),
                   divergence=d.get("divergence", {}), config=d.get("config", {}), best=d.get("best"),
                   reference=d.get("reference"), base=d.get("base"))  # fmt: skip


class RunCheckpoints:
    """`<output_dir>/checkpoints`: opened on first use, closed by `close` (orbax's threads)."""

    def __init__(self, output_dir: epath.Path, *, keep: int, best_maximize: bool | None):
        self.output_dir = output_dir
        self.keep, self.best_maximize = keep, best_maximize
        self._ckpt: Checkpointer | None = None
        self.size: int | None = None  # bytes of one checkpoint's arrays (`check_space`)
        self._saving: int | None = None  # the step of the newest save started

    @property
    def directory(self):
        return self.output_dir / "checkpoints"

    @property
    def checkpointer(self) -> Checkpointer:
        if self._ckpt is None:
            self._ckpt = Checkpointer(self.directory, keep=self.keep, best=self.best_maximize)
        return self._ckpt

    def latest_step(self) -> int | None:
        return self.checkpointer.latest_step()

    def save(self, state: TrainState, meta: RunMeta, *, frozen: tuple[str, ...], metric: float | None = None):
        """Start saving (orbax writes in the background); a write that fails for lack of space, here or
        at a later `wait` / `close`, is a NoSpaceError naming what was kept."""
        with self._space_errors():  # the previous save first: a failure of its writes is named as its own
            self.checkpointer.wait()
        self._saving = meta.step
        with self._space_errors():
            self.checkpointer.save(meta.step, state.to_checkpoint(frozen), meta.to_json(), metric=metric)

    def check_space(self, state: TrainState, *, frozen: tuple[str, ...]) -> None:
        """Before the first checkpoint write: refuse a run whose filesystem (where it says) has not room
        for one checkpoint. A joint decision: process 0 looks, every process refuses."""
        self.size = diskspace.checkpoint_bytes(state.to_checkpoint(frozen))
        free = diskspace.free_bytes(self.directory) if is_main_process() else None
        if any_process(free is not None and free < self.size):
            if free is None:
                raise NoSpaceError(
                    f"train.output_dir {self.output_dir}: too little free space (see process 0)"
                )
            raise NoSpaceError(
                f"train.output_dir {self.output_dir}: a checkpoint of this run takes about "
                f"{diskspace.size_text(self.size)}; {diskspace.size_text(free)} are free there. Free space, "
                "or give another train.output_dir"
            )

    @contextlib.contextmanager
    def _space_errors(self):
        try:
            yield
        except Exception as e:
            if not diskspace.out_of_space(e):
                raise
            self._drop_checkpointer()  # its pending save failed: a later close must not raise it again
            why = diskspace.excerpt(e)
            free = diskspace.free_bytes(self.directory)
            need = "" if self.size is None else f"; a checkpoint takes about {diskspace.size_text(self.size)}"
            free = "" if free is None else f", {diskspace.size_text(free)} are free there"
            kept = self._committed()
            raise NoSpaceError(
                f"checkpoint at step {self._saving} could not be written to {self.directory}: the filesystem "
                f"is full ({why}){need}{free}. kept: "
                + (
                    f"the checkpoint at step {kept}"
                    if kept is not None
                    else "no checkpoint (none was written)"
                )
                + "; free space and run the same command again to continue from it"
            ) from None

    def _drop_checkpointer(self) -> None:
        old, self._ckpt = self._ckpt, None
        if old is not None:
            try:
                old.close()
            except Exception as e:  # noqa: BLE001 (the failed save again, already being reported)
                log.debug("closing the checkpointer after a failed save: %s", e)

    def _committed(self) -> int | None:
        """The newest checkpoint on disk, read afresh (orbax also removes the failed save's temporary
        directory when it opens the directory)."""
        try:
            ckpt = Checkpointer(self.directory, keep=self.keep, best=self.best_maximize)
        except Exception:  # noqa: BLE001 (a message's detail: the directory may not even list)
            return None
        try:
            return ckpt.latest_step()
        finally:
            ckpt.close()

    def restore(self, state: TrainState, *, frozen: tuple[str, ...], step: int | None = None):
        """The newest intact checkpoint (at or before `step`) into `state`'s shardings: (state, meta).
        Damaged newer ones are moved aside with a warning. (state, None) when there is none."""
        ckpt = self.checkpointer
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            return state, None
        if step not in ckpt.steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory}; have {ckpt.steps()}")
        saved, meta, skipped = ckpt.restore_intact(state.abstract_checkpoint(frozen), step)
        for bad, why in skipped:
            log.warning("checkpoint at step %d is damaged: %s; moved aside to %s.damaged/, resuming from "
                        "step %d", bad, why, ckpt.directory, meta["step"])  # fmt: skip
        return state.from_checkpoint(saved, frozen), RunMeta.from_json(meta)

    def params_at(self, state: TrainState, step: int, *, frozen: tuple[str, ...]):
        """The trained parameters of checkpoint `step` (the best export), then the checkpointer closed."""
        try:
            saved, _ = self.checkpointer.restore(state.abstract_checkpoint(frozen), step)
        finally:
            self.close()
        return state.from_checkpoint(saved, frozen).params

    def newest_meta(self) -> RunMeta | None:
        """The meta of the newest checkpoint whose meta reads (a damaged newest one is skipped)."""
        if not self.directory.exists() or self.latest_step() is None:
            return None
        for step in reversed(self.checkpointer.steps()):
            try:
                return RunMeta.from_json(self.checkpointer.meta(step))
            except Exception as e:  # orbax raises many kinds for missing or truncated files
                log.warning("checkpoint at step %d: metadata unreadable (%s)", step, type(e).__name__)
        return None

    def check_resumable(self, config: Config, layout: str) -> None:
        """Refuse (before any forward pass) a config whose optimisation settings differ from the newest
        checkpoint's, unless `train.allow_config_change`, and data or batch settings the saved data
        position does not belong to (`layout`: the iterator's layout hash)."""
        meta = self.newest_meta()
        if meta is None:
            return
        where = f"{self.directory / str(meta.step)}"
        changed = [c for c in config_changes(meta.config, config) if c[0] not in RESUMABLE_CHANGES]
        if changed and not config.train.allow_config_change:
            diff = "\n".join(f"  {name}: {old!r} -> {new!r}" for name, old, new in changed)
            raise ConfigError(
                f"{self.output_dir} holds a run whose settings differ from this config ({where}):\n"
                f"{diff}\nResume with the run's settings, give another train.output_dir, or pass "
                "--train.allow_config_change true to continue with the new ones"
            )
        if meta.data["layout"] != layout:
            raise ConfigError(
                f"the data or batch settings differ from those of checkpoint {where} (its data position "
                "belongs to other pairs, another seed or other batch settings): resume with the run's "
                "data, or give another train.output_dir"
            )

    def check_base(self, config: Config, weights: str) -> None:
        """Refuse (before the reference pass) a resume whose weights at model.path are not those the
        newest checkpoint trained from (`weights`: their fingerprint now), unless `train.allow_base_change`,
        which then says what the run continues with."""
        meta = self.newest_meta()
        if meta is None or meta.base is None or meta.base["weights"] == weights:
            return
        where, old, new = self.directory / str(meta.step), meta.base["weights"][:16], weights[:16]
        keys = ", ".join(f"{s} {k}" for s, k in sorted(meta.base.get("reference_keys", {}).items()))
        against = f" (and against the reference cache entries {keys})" if keys else ""
        changed = (
            f"model.path {config.model.path}: its weights changed since checkpoint {where} was saved "
            f"(fingerprint {old} then, {new} now)"
        )
        if not config.train.allow_base_change:
            raise ConfigError(
                f"{changed}. The checkpoint trained from the old weights{against}; resuming would continue "
                "its policy against a reference taken from the new ones, two models mixed. Put the original "
                "weights back, start again in another train.output_dir, or pass --train.allow_base_change "
                "true to continue on the new weights"
            )
        lora = " (LoRA: the checkpoint's adapters on the new base)" if config.lora.rank else ""
        log.warning(
            "train.allow_base_change: %s. The policy continues from the checkpoint's weights%s; a reference "
            "that is the initial weights is taken from the new ones (cached: computed again under new keys; "
            "the checkpoint trained%s), so losses and rewards from step %d on are measured against another "
            "reference than before; the checkpoints from here on record the new fingerprint",
            changed, lora, against or " against the old weights", meta.step,
        )  # fmt: skip

    def keep_config(self, config: Config, start: int) -> None:
        """config.yaml is the config the run was started with; a resume with another config (only
        what `train.allow_config_change` or RESUMABLE_CHANGES admit gets here) adds config.<step>.yaml."""
        first = self.output_dir / "config.yaml"
        if start == 0 or not first.exists():
            dump(config, first)
        elif config_changes(to_dict(load_config(first)), config):
            dump(config, self.output_dir / f"config.{start}.yaml")

    def wait(self) -> None:
        with self._space_errors():
            self.checkpointer.wait()

    def close(self) -> None:
        if self._ckpt is not None:
            ckpt, self._ckpt = self._ckpt, None
            with self._space_errors():
                ckpt.close()
