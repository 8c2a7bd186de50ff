"""jdpo: Direct Preference Optimization for language models in JAX / Flax NNX.

The loss library is importable on its own and fast: `from jdpo import dpo_loss, kto_loss, sequence_logprobs`
loads only jax (no flax, no transformers). Heavier parts load on first use.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily (PEP 562) so that importing jdpo stays light.
_LAZY = {
    "dpo_loss": "jdpo.losses.pairwise",
    # Unpaired feedback (one completion, desirable or not): KTO / BCO / APO-zero unpaired and their helpers.
    "kto_loss": "jdpo.losses.unpaired",
    "kto_kl": "jdpo.losses.unpaired",
    "kto_metric_means": "jdpo.losses.unpaired",
    "running_moments_init": "jdpo.losses.unpaired",
    "running_moments_update": "jdpo.losses.unpaired",
    "check_unpaired_options": "jdpo.losses.unpaired",
    "UNPAIRED_LOSS_TYPES": "jdpo.losses.unpaired",
    "sequence_logprobs": "jdpo.losses.logprobs",
    "sequence_logprobs_from_hidden": "jdpo.losses.logprobs",
    "token_logprobs": "jdpo.losses.logprobs",
    "token_logprobs_from_hidden": "jdpo.losses.logprobs",
    "segment_logprobs": "jdpo.losses.logprobs",
    "wpo_weights": "jdpo.losses.logprobs",
    "from_pretrained": "jdpo.models",
    "ModelOptions": "jdpo.models",
    "save_pretrained": "jdpo.models",
    "load_preferences": "jdpo.data",
    # The mismatched pairing KTO's KL estimate is taken over: a rule of the data, not of the loss.
    "kl_mismatch_order": "jdpo.data.unpaired",
    "load_config": "jdpo.config",
    "Config": "jdpo.config",
    "Trainer": "jdpo.train.trainer",
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
