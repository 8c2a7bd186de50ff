"""Training checkpoints: every orbax call of the project lives here, behind a small interface.

A checkpoint is one step directory `<output_dir>/checkpoints/<step>/` holding two items:
- `state`: a pytree of arrays (parameters, optimizer state, step counter, RNG key data), saved
  sharded and restored straight into the shardings of an abstract target;
- `meta`: a small JSON dict (data-iterator position, epoch, anything the loop needs to resume exactly).
`jdpo.train.state.TrainState.to_checkpoint` / `from_checkpoint` map the train state to the `state` item and back.

Saves are asynchronous (the device-to-host copy happens before `save` returns, so the caller may
donate the arrays right after) and atomic (orbax writes to a temporary directory and renames it on
commit, so a crash mid-save leaves the previous checkpoint as the latest; on gs://, which has no
rename, orbax writes the step directory in place with a commit_success.txt last and counts only the
checkpoints that have one). Only the newest `keep` checkpoints are kept (and, with `best`, the one with the
best metric). The directory is local or
gs://bucket/... (orbax takes `etils.epath` paths and tensorstore writes to GCS itself; see
`jdpo.paths.check_checkpoint_dir`). All methods must be called on every process of a multi-host job
(orbax coordinates the processes itself).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from jdpo import paths
from jdpo.errors import UserError
from jdpo.parallel.distributed import any_process, is_main_process, sync
from jdpo.train.fingerprint import weights_fingerprint

log = logging.getLogger(__name__)

STATE = "state"
META = "meta"
METRIC = "keep_best"  # the orbax metric a checkpoint is ranked by (`Checkpointer(best=...)`)
FINGERPRINT = "state_fingerprint"  # in meta: `jdpo.train.fingerprint.weights_fingerprint` of the state item


def _ocp():
    # Imported lazily: orbax pulls in a lot (tensorstore, asyncio machinery) that commands like
    # `jdpo --help` or the loss tests never need.
    from orbax.checkpoint import v1 as ocp

    return ocp


class DamagedCheckpointError(UserError, FileNotFoundError):
    """No checkpoint of a run loads intact; the message says what is wrong with each."""


class Checkpointer:
    """The newest `keep` checkpoints of one run under `directory`.

    Usage:
        ckpt = Checkpointer(out / "checkpoints", keep=2)
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(abstract_state)
        ...
        ckpt.save(step, state, {"data": it.state()})
        ckpt.close()   # waits for the pending save
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best: bool | None = None):
        """best: None, or True / False to also keep, outside the newest-`keep` rotation, the one checkpoint
        whose `save(..., metric=)` value is the highest / lowest (saves without a metric do not compete)."""
        paths.check_checkpoint_dir(directory)
        self.directory = paths.as_path(directory)
        if paths.is_local(self.directory):
            # Absolute: orbax's tensorstore writer refuses relative paths, and `train.output_dir` is
            # usually given relative to where the command runs (e.g. the demo's runs/demo).
            self.directory = self.directory.absolute()
        self.keep, self.best = keep, best
        self._open()

    def _open(self) -> None:
        ocp = _ocp()
        policies = ocp.training.preservation_policies
        policy = policies.LatestN(self.keep)
        if self.best is not None:
            # orbax sorts ascending (descending with reverse) and keeps the last n.
            best = policies.BestN(
                get_metric_fn=lambda m: m[METRIC],
                reverse=not self.best,
                n=1,
                keep_checkpoints_without_metrics=False,
            )
            policy = policies.AnyPreservationPolicy([policy, best])
        self._ckptr = ocp.training.Checkpointer(
            self.directory,
            preservation_policy=policy,
            # Every save below is forced: the training loop decides when to save, not orbax.
            save_decision_policy=ocp.training.save_decision_policies.FixedIntervalPolicy(1),
            cleanup_tmp_directories=True,
        )

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        return [c.step for c in self._ckptr.checkpoints]

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or None when there is none."""
        latest = self._ckptr.latest
        return None if latest is None else latest.step

    def save(self, step: int, state: Any, meta: dict[str, Any], metric: float | None = None) -> None:
        """Start saving `state` (pytree of jax arrays) and `meta` (JSON-able dict) at `step`; `metric`:
        its value for the `best` rule.

        Returns once the arrays have been copied off the device; writing continues in the background.
        A checkpoint already at `step` (e.g. a final save right after a periodic one) is left alone.
        """
        if step in self.steps():
            return
        # What the arrays hash to, so a restore can tell when bytes changed on disk (orbax would load
        # flipped bytes of a chunk silently).
        meta = {**meta, FINGERPRINT: weights_fingerprint(state)}
        self._ckptr.save_checkpointables_async(
            step, {STATE: state, META: meta}, force=True, metrics=None if metric is None else {METRIC: metric}
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Load checkpoint `step` (default: the newest) into the shapes, dtypes and shardings of
        `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with `.sharding`). Returns (state, meta)."""
        state, meta = self._load(abstract_state, step)
        meta.pop(FINGERPRINT, None)  # the checkpoint's own bookkeeping, not the caller's meta
        return state, meta

    def _load(self, abstract_state: Any, step: int | None) -> tuple[Any, dict[str, Any]]:
        self.wait()
        out = self._ckptr.load_checkpointables(step, {STATE: abstract_state, META: None})
        return out[STATE], dict(out[META])

    def restore_intact(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[Any, dict[str, Any], list[tuple[int, str]]]:
        """The newest checkpoint (at or before `step`) that loads and whose arrays match the fingerprint
        saved with them. Newer damaged ones (missing or truncated files, changed bytes) are moved aside
        to `<directory>.damaged/<step>`, never deleted, and returned as `skipped` [(step, why)].
        A joint decision on a multi-host run: a checkpoint damaged on any process is skipped by all."""

        self.wait()
        skipped: list[tuple[int, str]] = []
        for s in [s for s in reversed(self.steps()) if step is None or s <= step]:
            problem = None
            try:
                state, meta = self._load(abstract_state, s)
                want = meta.pop(FINGERPRINT, None)
                if want is not None and weights_fingerprint(state) != want:
                    problem = "its arrays do not match the fingerprint saved with them (changed on disk)"
            except Exception as e:  # orbax raises many kinds for missing or truncated files
                problem = f"it does not load ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
            if not any_process(problem is not None):
                return state, meta, skipped
            skipped.append((s, problem or "it does not load on another process"))
            self._move_aside(s)
        raise DamagedCheckpointError(
            f"no intact checkpoint in {self.directory} (the damaged ones are moved aside to "
            f"{self.directory.name}.damaged/): "
            + "; ".join(f"step {s}: {why}" for s, why in skipped)
            + "; start again in another train.output_dir, or restore a checkpoint from a copy"
        )

    def _move_aside(self, step: int) -> None:

        if is_main_process():
            aside = self.directory.parent / f"{self.directory.name}.damaged"
            aside.mkdir(parents=True, exist_ok=True)
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            (self.directory / str(step)).rename(target)
        sync(f"jdpo checkpoint {step} moved aside")
        self._ckptr.close()
        self._open()  # orbax lists the steps once; it must see the directory without the damaged one

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The `meta` item alone of checkpoint `step` (default: the newest): cheap, no arrays read."""
        self.wait()
        meta = dict(self._ckptr.load_checkpointables(step, {META: None})[META])
        meta.pop(FINGERPRINT, None)
        return meta

    def wait(self) -> None:
        """Block until the pending save (if any) has been committed to disk."""
        self._ckptr.wait()

    def close(self) -> None:
        """Wait for the pending save, then release orbax's background threads."""
        self._ckptr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_like(tree: Any) -> Any:
    """Abstract target (shape, dtype, sharding) of a pytree of arrays, for `Checkpointer.restore`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def nest(tree: Any, exclude: tuple[str, ...] = ()) -> dict:
    """A pytree (a dict at the top) as nested plain dicts of its arrays, keyed by the path names: what
    orbax stores readably, whatever custom nodes (nnx.State, optax states) the tree is made of.
    Top-level keys in `exclude` are left out."""
    out: dict = {}
    flat = jax.tree_util.tree_flatten_with_path({k: v for k, v in tree.items() if k not in exclude})[0]
    for path, leaf in flat:
        node = out
        names = [_name(k) for k in path]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def unnest(saved: dict, like: Any, exclude: tuple[str, ...] = ()) -> Any:
    """Inverse of `nest`: the arrays of `saved` put back into the structure of `like`; the excluded
    top-level keys are taken from `like` as they are."""
    paths, treedef = jax.tree_util.tree_flatten_with_path({k: v for k, v in like.items() if k not in exclude})
    leaves = []
    for path, _ in paths:
        node = saved
        for k in path:
            node = node[_name(k)]
        leaves.append(node)
    out = jax.tree.unflatten(treedef, leaves)
    out.update({k: like[k] for k in exclude if k in like})
    return out
