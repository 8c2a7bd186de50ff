"""A PEFT adapter directory's `adapter_config.json`: read and checked field by field."""

from __future__ import annotations

import json
import math
import os

from jdpo.models.hf import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"


def _field_error(path: str, field: str, want: str, got) -> CheckpointError:
    return CheckpointError(
        f"{path}: {field} must be {want}, got {got!r}; fix the field or re-export the adapter"
    )


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of `adapter_dir` as a dict whose fields jdpo reads have the right types.

    Raises CheckpointError naming the file (and the field, or the JSON line and column) when the file
    is not a JSON object or a field has the wrong type: `r` a positive integer, `lora_alpha` and
    `lora_dropout` numbers, `target_modules` a name or a list of names, `base_model_name_or_path`,
    `peft_type` strings."""
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
    for field in ("base_model_name_or_path", "peft_type"):
        value = cfg.get(field)
        if value is not None and not isinstance(value, str):
            raise _field_error(path, field, "a string", value)
    return cfg
