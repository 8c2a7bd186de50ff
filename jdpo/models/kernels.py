"""Which attention kernel a model runs (`model.attention`), decided in one place: `resolve_attention`.

Kernels of attention without a KV cache (training, the reference pass, scoring); all agree to float
rounding on every non-padding position:
  blocked     `jdpo.models.attention`: segment-aware block-sparse attention in plain JAX (any device;
              tuned on XLA:CPU);
  splash      `jdpo.models.splash`: TPU Splash attention (Pallas) with segment ids, causal / local
              masks, soft-capping, grouped-query heads; skips the tiles the causal / local mask empties;
  pallas_gpu  `jdpo.models.pallas_gpu`: the Pallas (Triton) flash-attention kernel for NVIDIA GPUs
              with segment ids; no soft-cap, no sliding window;
  xla         `jax.nn.dot_product_attention` with a dense [B, 1, T, T] mask (any device; the reference
              the others are tested against);
  auto        (the default) splash on TPU, pallas_gpu on NVIDIA GPUs (blocked for models it cannot
              run: soft-capped or sliding-window attention), blocked elsewhere.
The KV-cache path (generation) always takes the dense mask. Rows split over `mesh.context` run the
blocked kernel, splash or pallas_gpu (those two inside the ring, `jdpo.models.ring_pallas`, pallas_gpu
through jdpo's own flash kernel `jdpo.models.flash_gpu`); `auto` is splash on TPU (unless
`model.context_attention: all_gather`) and blocked elsewhere there (pallas_gpu in the ring is not yet
measured on a GPU), and xla is refused with the reason (`choices.context_refusal`).

`resolve_attention` turns the requested name into the kernel and the reason, for the model's
configuration and the backend. `Transformer` calls it when it is built (so every caller, the trainer,
`jdpo eval`, generation, `jdpo plan`, `jdpo bench`, gets the same answer) and keeps the reason, which
the trainer logs. A kernel the model cannot run is refused there, before any weight is loaded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jdpo.errors import ConfigError
from jdpo.models import attention, pallas_gpu, splash
from jdpo.models.choices import RING_KERNELS, context_refusal

ATTENTION_KERNELS = ("blocked", "splash", "pallas_gpu", "xla")
ATTENTION_CHOICES = ("auto", *ATTENTION_KERNELS)
#: Kernels whose backward pass recomputes the probabilities from a float32 log-sum-exp per query head
#: and token (flash-attention style) instead of keeping the [N, T] probabilities of each token.
LSE_KERNELS = ("blocked", "splash", "pallas_gpu")
#: Kernels that keep their grouped-query k / v repeated to one per query head for the backward pass.
REPEATS_KV = ("pallas_gpu",)
#: Kernels that run the shared-prefix rule of `jdpo.models.masks` (the shared-prompt layout): splash and
#: pallas_gpu take segment ids as plain equality classes.
SHARED_PREFIX_KERNELS = ("blocked", "xla")


class AttentionChoice(NamedTuple):
    kernel: str  # one of ATTENTION_KERNELS
    reason: str  # for the run log: what was asked and why this kernel


def default_block(kernel: str) -> int:
    """Positions per tile when `model.attention_block` is 0 (each kernel's own default)."""
    return {"splash": splash.DEFAULT_BLOCK, "pallas_gpu": pallas_gpu.DEFAULT_BLOCK}.get(
        kernel, attention.DEFAULT_BLOCK
    )


def tile_of(kernel: str, block: int, T: int) -> int:
    """The tile `kernel` runs with `model.attention_block` resolved to `block` on rows of T positions."""
    if kernel == "splash":
        return splash.tile_for(T, block)
    return block


def _nvidia_gpu(backend: str) -> bool:
    if backend != "gpu":
        return False
    try:
        version = jax.devices("gpu")[0].client.platform_version.lower()
    except Exception:  # no such attribute on some runtimes: jax's "gpu" backend is CUDA unless ROCm says so
        return True
    return "rocm" not in version and "hip" not in version


def unsupported(kernel: str, config) -> str | None:
    """Why `kernel` cannot run the model of `config` (a `ModelConfig`), or None when it can."""
    if getattr(config, "attention_sinks", False) and kernel != "xla":
        return f"it has no attention sinks ({config.family} adds a learned sink logit to every softmax)"
    if kernel == "pallas_gpu":
        if config.attn_logit_softcapping is not None:
            cap = config.attn_logit_softcapping
            return f"it cannot soft-cap attention logits ({config.family} has attn_logit_softcapping={cap})"
        if any(config.sliding_layers):
            return f"it has no sliding window ({config.family} has sliding_window={config.sliding_window})"
    return None


def resolve_attention(
    requested: str, config, *, backend: str | None = None, context: int = 1, how: str = "auto"
) -> AttentionChoice:
    """The kernel `model.attention = requested` runs for the model of `config` (a `ModelConfig`) on
    `backend` (default: jax's) with rows split over `context` devices (`mesh.context`, keys reaching
    them by `how`, `model.context_attention`). Raises `ConfigError` for a kernel the model cannot run."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"model.attention must be one of {list(ATTENTION_CHOICES)}, got {requested!r}")
    if context > 1:  # blocked, splash and pallas_gpu take a shard of the queries (`context_attention`)
        why = context_refusal(requested, context, how)
        if why:
            raise ConfigError(why)
        if requested != "auto":
            why = unsupported(requested, config)
            if why:
                raise ConfigError(
                    f"model.attention={requested} cannot run this model: {why}; use auto or blocked"
                )
            return AttentionChoice(
                requested, f"model.attention={requested}, rows over mesh.context={context}"
            )
        tpu = (backend or jax.default_backend()) == "tpu"
        if tpu and how != "all_gather" and not unsupported("splash", config):  # splash runs in the ring
            return AttentionChoice("splash", f"model.attention=auto on TPU, rows over mesh.context={context}")
        return AttentionChoice("blocked", f"model.attention=auto, rows over mesh.context={context}")
    if requested != "auto":
        why = unsupported(requested, config)
        if why:
            raise ConfigError(
                f"model.attention={requested} cannot run this model: {why}; use auto or "
                f"{'xla' if getattr(config, 'attention_sinks', False) else 'blocked'}"
            )
        return AttentionChoice(requested, f"model.attention={requested}")
    if backend is None:
        backend = jax.default_backend()
    if getattr(config, "attention_sinks", False):
        return AttentionChoice(
            "xla", f"model.attention=auto: {config.family}'s attention sinks run on xla only"
        )
    if backend == "tpu":
        return AttentionChoice("splash", "model.attention=auto on TPU")
    if _nvidia_gpu(backend):
        why = unsupported("pallas_gpu", config)
        if why:
            return AttentionChoice("blocked", f"model.attention=auto on an NVIDIA GPU, not pallas_gpu: {why}")
        return AttentionChoice("pallas_gpu", "model.attention=auto on an NVIDIA GPU")
    return AttentionChoice("blocked", f"model.attention=auto on {backend}")


def shares_prompt(requested: str, kernel: str, config, *, context: int = 1) -> tuple[bool, str]:
    """Whether a run lays its pairs out with the prompt shared (`data.shared_prompt` = requested: auto,
    true or false) under the resolved `kernel` for the model of `config` with rows split over `context`
    devices: (True / False, the reason for the run log). Raises `ConfigError` for true where it cannot
    run: a kernel without the shared-prefix rule (splash and pallas_gpu have it in the context ring only,
    where a second call per chunk pair attends the prefix: `jdpo.models.ring_pallas`), or a
    sliding-window model (its window counts row slots, which a branch after its sibling does not share
    with its prompt)."""
    why = None
    if kernel not in SHARED_PREFIX_KERNELS and not (kernel in RING_KERNELS and context > 1):
        why = f"the {kernel} attention kernel has no shared-prefix rule (blocked and xla have)"
    elif any(config.sliding_layers):
        why = f"{config.family} has sliding_window={config.sliding_window}, counted in row slots"
    if requested == "false":
        return False, "data.shared_prompt=false"
    if why is None:
        return True, f"data.shared_prompt={requested}"
    if requested == "true":
        raise ConfigError(f"data.shared_prompt=true cannot run here: {why}; use auto or false")
    return False, f"data.shared_prompt=auto, off: {why}"
