"""Reading a batch back: the inverse of `jdpo.data.make_batch`, for the tests that check what the rows
hold (batching, the unpaired batch kind, online pairs)."""

from typing import Any

import numpy as np


def unpack_batch(batch) -> list[dict[str, Any]]:
    """The inverse of `make_batch`: one dict per filled slot with pair_id,
    chosen / rejected (the whole sequence, prompt + completion, in either layout) and chosen_scored /
    rejected_scored (the targets under loss_mask, i.e. the completion tokens as scored)."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        for k, pid in enumerate(batch["pair_ids"][b].tolist()):
            if pid < 0:
                continue
            item: dict[str, Any] = {"pair_id": pid, "row": b, "slot": k}
            prompt = batch["input_ids"][b][batch["segment_ids"][b] == -(k + 1)]  # shared: all but its end
            for name, s in (("chosen", 2 * k + 1), ("rejected", 2 * k + 2)):
                sel = batch["segment_ids"][b] == s
                item[name] = np.concatenate([prompt, batch["input_ids"][b][sel]])
                item[f"{name}_scored"] = batch["targets"][b][sel & (batch["loss_mask"][b] > 0)]
            out.append(item)
    return out
