"""A run's exports: the Hugging Face checkpoint (`final/`, `best/`), or for LoRA the PEFT adapter
directory with the merged model beside it (`final_merged/`), each with its model card. Every process
takes part in gathering
the shards; only process 0 writes.

safetensors' save_file and tokenizer.save_pretrained write local files only: on an object store the
export is written to a local temporary directory, then copied over file by file (`paths.staged_dir`;
the weight shards of an earlier export that this one does not overwrite are then deleted, as
save_pretrained does locally). Readers may see a half-copied directory while that runs.
"""

from __future__ import annotations

import json
import logging
import re

import jax
from etils import epath

from jdpo import paths
from jdpo.models import lora, save_pretrained
from jdpo.models.peft import save_adapter
from jdpo.train.model_card import ModelCard, write_card

log = logging.getLogger(__name__)


def is_weight_file(name: str) -> bool:
    """An exported weight file (`model.safetensors`, `model-00001-of-00002.safetensors`, the index)."""
    return re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name) is not None


def export_model(model, output_dir: epath.Path, name: str, *, lora_run: bool, base_model: str, tokenizer,
                 card: ModelCard | None = None, best: bool = False):  # fmt: skip
    """`model` as `<output_dir>/<name>`: a Hugging Face checkpoint, or (LoRA) a PEFT adapter directory
    with `<name>_merged` beside it; each with its model card (`README.md`, `jdpo.train.model_card`)
    when `card` is given (`best`: the export of `train.keep_best`'s checkpoint). Returns
    `<output_dir>/<name>`."""
    out = output_dir / name
    main = jax.process_index() == 0
    if lora_run:
        with paths.staged_dir(out, upload=main) as local:
            save_adapter(model, local, base_model=base_model)
            tokenizer.save_pretrained(local)
            if card is not None and main:
                write_card(local, card, "adapter", name, best=best)
        model, out_merged = lora.merged(model), output_dir / f"{name}_merged"
    else:
        out_merged = out
    with paths.staged_dir(out_merged, upload=main, prune=is_weight_file) as local:
        save_pretrained(model, local, tokenizer=tokenizer)
        if card is not None and main:
            write_card(local, card, "merged" if lora_run else "model", out_merged.name, best=best)
    return out


def write_best_json(best_dir: epath.Path, best) -> None:
    """`best.json`: which step and value `best/` holds (`best`: the loop's `guards.BestEval`)."""
    if jax.process_index() == 0:
        (best_dir / "best.json").write_text(json.dumps({"step": best.step, "metric": best.metric,
                                                        "value": best.value}))  # fmt: skip
    log.info("best/: the policy at step %d (%s = %.6g)", best.step, best.metric, best.value)
