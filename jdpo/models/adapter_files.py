"""A PEFT adapter directory's `adapter_config.json`: read and checked field by field, and the base it
was trained on recorded and verified.

An adapter is only meaningful on the exact base it was trained on. jdpo's export records the base as
an absolute path (`base_model_name_or_path`; a relative one would resolve against whatever directory
`jdpo eval` / `jdpo generate` runs from) and a fingerprint of its files (`jdpo_base_fingerprint`).
Loading the adapter recomputes the fingerprint and refuses a base whose files differ, naming both.

The fingerprint is a SHA-256 over config.json and every `*.safetensors` file of the directory (name,
size, content). Files up to `FULL_HASH_BYTES` are hashed whole; a larger one by its safetensors header
and `SAMPLED_BLOCKS` blocks of 1 MiB spread evenly over it, so that checking a 70B base reads about
a gigabyte rather than all of it (a different model, a re-quantised or re-saved one, a fine-tuned one
changes sampled bytes; a change confined to bytes between samples of a file above 1 GiB is not seen).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import struct

from jdpo.models.hf import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
BASE_FINGERPRINT = "jdpo_base_fingerprint"
FULL_HASH_BYTES = 1 << 30
SAMPLED_BLOCKS = 256
_BLOCK_BYTES = 1 << 20

log = logging.getLogger("jdpo")


def base_fingerprint(base_dir) -> str:
    """SHA-256 of a checkpoint directory's config.json and safetensors files (see the module docstring)."""
    base_dir = os.fspath(base_dir)
    h = hashlib.sha256()
    files = [
        os.path.join(base_dir, "config.json"),
        *sorted(glob.glob(os.path.join(base_dir, "*.safetensors"))),
    ]
    for path in files:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}|{size}\n".encode())
        with open(path, "rb") as f:
            if size <= FULL_HASH_BYTES:
                for chunk in iter(lambda: f.read(_BLOCK_BYTES), b""):
                    h.update(chunk)
                continue
            header = struct.unpack("<Q", f.read(8))[0]
            h.update(f.read(min(header, size - 8)))
            step = (size - _BLOCK_BYTES) / (SAMPLED_BLOCKS - 1)
            for i in range(SAMPLED_BLOCKS):
                f.seek(math.floor(i * step))
                h.update(f.read(_BLOCK_BYTES))
    return h.hexdigest()


def _field_error(path: str, field: str, want: str, got) -> CheckpointError:
    return CheckpointError(
        f"{path}: {field} must be {want}, got {got!r}; fix the field or re-export the adapter"
    )


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of `adapter_dir` as a dict whose fields jdpo reads have the right types.

    Raises CheckpointError naming the file (and the field, or the JSON line and column) when the file
    is not a JSON object or a field has the wrong type: `r` a positive integer, `lora_alpha` and
    `lora_dropout` numbers, `target_modules` a name or a list of names, `base_model_name_or_path`,
    `peft_type` and `jdpo_base_fingerprint` strings."""
    path = os.path.join(os.fspath(adapter_dir), ADAPTER_CONFIG)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the file or "
            "re-export the adapter"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object of adapter settings, got a {type(cfg).__name__}; fix the file "
            "or re-export the adapter"
        )
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _field_error(path, "r", "a positive integer", r)
    for field in ("lora_alpha", "lora_dropout"):
        value = cfg.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _field_error(path, field, "a finite number", value)
    targets = cfg.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):  # fmt: skip
        raise _field_error(path, "target_modules", "a module name or a list of module names", targets)
    for field in ("base_model_name_or_path", "peft_type", BASE_FINGERPRINT):
        value = cfg.get(field)
        if value is not None and not isinstance(value, str):
            raise _field_error(path, field, "a string", value)
    return cfg


def record_base(base_model) -> dict:
    """The adapter_config.json fields that name the base: its absolute path and, for a local checkpoint
    directory, its fingerprint."""
    base = os.fspath(base_model)
    if not os.path.isdir(base):
        return {"base_model_name_or_path": base}
    return {"base_model_name_or_path": os.path.abspath(base), BASE_FINGERPRINT: base_fingerprint(base)}


def verified_base(adapter_dir, cfg: dict) -> str:
    """The local base checkpoint directory the adapter (`cfg`: its adapter_config.json) names, after
    checking that its files are the ones the adapter was exported with. Raises CheckpointError naming
    the recorded path and both fingerprints on a mismatch."""
    path = os.path.join(os.fspath(adapter_dir), ADAPTER_CONFIG)
    base = cfg.get("base_model_name_or_path") or ""
    if not os.path.exists(os.path.join(base, "config.json")):
        raise CheckpointError(
            f"{path}: base_model_name_or_path {base!r} is not a local Hugging Face checkpoint directory; "
            "set it to the base model the adapter was trained on"
        )
    want = cfg.get(BASE_FINGERPRINT)
    if want is None:
        log.warning("%s records no %s: the base %s is used unverified", path, BASE_FINGERPRINT, base)
        return base
    have = base_fingerprint(base)
    if have != want:
        raise CheckpointError(
            f"{path}: the adapter was exported on the base {base} with fingerprint {want}, but the "
            f"files there now have fingerprint {have} (the base was changed or replaced); put the "
            "original base back, or point base_model_name_or_path at a copy of it"
        )
    return base
