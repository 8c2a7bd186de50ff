"""Decoder models: one NNX transformer configured per family, HF import/export, sharded random init.

The names below resolve on first use (PEP 562), so that `jdpo.config` can read the JAX-free rules of
`jdpo.models.choices` without loading JAX.
"""

import importlib

# name -> module that defines it
_LAZY = {
    "FAMILIES": "jdpo.models.config",
    "config_from_hf": "jdpo.models.config",
    "config_to_hf": "jdpo.models.config",
    "ModelConfig": "jdpo.models.config",
    "weight_table": "jdpo.models.families",
    "CheckpointError": "jdpo.models.hf",
    "from_pretrained": "jdpo.models.hf",
    "init_model": "jdpo.models.hf",
    "save_pretrained": "jdpo.models.hf",
    "AttentionMask": "jdpo.models.masks",
    "ModelOptions": "jdpo.models.options",
    "Transformer": "jdpo.models.transformer",
    "load_tokenizer": "jdpo.models.hf_tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jdpo.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
