"""jdpo: Direct Preference Optimization for language models in JAX / Flax NNX.

The loss library is importable on its own and fast: `from jdpo import dpo_loss, kto_loss, sequence_logprobs`
loads only jax (no flax, no transformers). Heavier parts load on first use.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily (PEP 562) so that importing jdpo stays light.
_LAZY = {
    "dpo_loss": "jdpo.losses",
    # Unpaired feedback (one completion, desirable or not): KTO / BCO / APO-zero unpaired and their helpers.
    "kto_loss": "jdpo.unpaired_losses",
    "kto_kl": "jdpo.unpaired_losses",
    "kl_mismatch_order": "jdpo.unpaired_losses",
    "kto_metric_means": "jdpo.unpaired_losses",
    "running_moments_init": "jdpo.unpaired_losses",
    "running_moments_update": "jdpo.unpaired_losses",
    "check_unpaired_options": "jdpo.unpaired_losses",
    "UNPAIRED_LOSS_TYPES": "jdpo.unpaired_losses",
    "sequence_logprobs": "jdpo.logprobs",
    "sequence_logprobs_from_hidden": "jdpo.logprobs",
    "token_logprobs": "jdpo.logprobs",
    "token_logprobs_from_hidden": "jdpo.logprobs",
    "segment_logprobs": "jdpo.logprobs",
    "wpo_weights": "jdpo.logprobs",
    "from_pretrained": "jdpo.models",
    "ModelOptions": "jdpo.models",
    "save_pretrained": "jdpo.models",
    "load_preferences": "jdpo.data",
    "load_config": "jdpo.config",
    "Config": "jdpo.config",
    "Trainer": "jdpo.train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jdpo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
