"""The typed batch: the one input of the policy forward, from the data layer to the loss.

`Batch` is a frozen dataclass registered as a pytree, so the same object is the host-side batch (numpy
leaves, made by `jdpo.data.make_batch`), the device batch (global `jax.Array`s sharded over the mesh's
row axes, `on_mesh`), a step's stack of micro-batches (`stack`: a leading axis A) and the argument of the
jitted step functions. Layout (B rows, T tokens per row, P pair slots per row):

  input_ids   [B, T] int32    tokens; 0 in padding
  positions   [B, T] int32    position within the sequence (restarts at 0 in every pair's sequences)
  segment_ids [B, T] int32    0 = padding; pair slot k: chosen (prompt + chosen) in segment 2k+1,
                              rejected (prompt + rejected) in segment 2k+2; the shared-prompt layout
                              (`data.shared_prompt`): the prompt but its last token in segment -(k+1),
                              then its last token + chosen in 2k+1, its last token + rejected in 2k+2,
                              positions continuing after the prompt (each branch sees the prompt)
  targets     [B, T] int32    targets[t] = input_ids[t+1] when t+1 is in the same segment, else 0
  loss_mask   [B, T] float32  1 where targets[t] is a completion token (chosen / rejected incl. EOS)
  pair_ids    [B, P] int32    pair index of slot k in its split, -1 for an empty slot
  ref_chosen_logps, ref_rejected_logps  [B, P] float32 or None: cached reference log-probs of each
                              slot (0 in empty slots), attached with `with_reference`
  labels      [B, P] int32 or None: the unpaired batch kind (`jdpo.data.unpaired`; kto / bco /
                              apo_zero_unpaired): slot k holds one rated example, its completion in
                              segment 2k+1 and the mismatched KL completion (its prompt with another
                              example's completion) in segment 2k+2; 1 = desirable, 0 = undesirable or
                              empty. None for pairs.
  slots       [B, T] int32 or None: rows dealt over the mesh's context axis in blocks
                              (`jdpo.data.context_balance`, `model.context_balance: blocks`): the natural
                              row slot of each token, the [B, T] fields above being in the dealt order.
                              None: rows in their natural order.

Fields can also be read by name (`batch["input_ids"]`, `"loss_mask" in batch`, `set(batch)` = the
fields that are present), which is how host-side tools (FLOP counts) read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jdpo.parallel.sharding import batch_sharding

# The [B, T] arrays: padded to a common T when micro-batches of different lengths are stacked.
TOKEN_FIELDS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of packed preference pairs (see the module docstring for the layout)."""

    input_ids: Any
    positions: Any
    segment_ids: Any
    targets: Any
    loss_mask: Any
    pair_ids: Any
    ref_chosen_logps: Any = None
    ref_rejected_logps: Any = None
    labels: Any = None
    slots: Any = None

    # -- read by name ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        if name not in self:
            raise KeyError(f"batch has no field {name!r}; it has {sorted(self)}")
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in _FIELDS and getattr(self, name) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return (f for f in _FIELDS if getattr(self, f) is not None)

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, Any]]:
        return [(f, getattr(self, f)) for f in self]

    # -- shape -------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[-2])

    @property
    def valid_pairs(self):
        """[.., B, P] bool: which slots hold a pair."""
        return self.pair_ids >= 0

    # -- transformations (host or device) ----------------------------------------------------------

    def with_reference(self, chosen_BxP, rejected_BxP) -> Batch:
        """This batch with per-slot reference log-probs attached."""
        return dataclasses.replace(self, ref_chosen_logps=chosen_BxP, ref_rejected_logps=rejected_BxP)

    def without_reference(self) -> Batch:
        return dataclasses.replace(self, ref_chosen_logps=None, ref_rejected_logps=None)

    @classmethod
    def stack(cls, batches: Sequence[Batch]) -> Batch:
        """Host micro-batches -> one batch with a leading micro-batch axis A. Token arrays are
        right-padded with zeros to the longest T (padding is segment 0, scored nowhere), so length
        buckets of different T can share a step."""
        T = max(b.input_ids.shape[1] for b in batches)

        def pad(name: str, x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            if name == "slots":  # the padding's natural slots follow the row's
                more = np.arange(x.shape[1], T, dtype=x.dtype)
                return np.concatenate([x, np.broadcast_to(more, (len(x), len(more)))], axis=1)
            return np.pad(x, ((0, 0), (0, T - x.shape[1]))) if name in TOKEN_FIELDS else x

        fields = {
            f: np.stack([pad(f, getattr(b, f)) for b in batches]) for f in batches[0]
        }  # present fields only: every micro-batch has the same ones
        return cls(**fields)

    def on_mesh(self, mesh, *, accum: bool = False) -> Batch:
        """Host-local numpy rows -> global arrays with the rows over the mesh's row axes (the rows of
        every process together: each process passes only its own rows). `accum`: the batch has a
        leading micro-batch axis (`stack`), which is not sharded. Without a mesh: the default device."""
        if mesh is None:
            return jax.tree.map(jax.numpy.asarray, self)

        def place(x):
            x = np.asarray(x)
            sharding = batch_sharding(mesh, x.ndim - accum, accum=accum)
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree.map(place, self)


_FIELDS = tuple(f.name for f in dataclasses.fields(Batch))
