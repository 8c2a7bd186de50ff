"""How a decoder runs (`ModelOptions`: dtypes, memory, layout, kernel) and its LoRA adapters (`LoRASpec`)."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from jdpo.models.choices import EXPERT_TARGETS, FUSED_TARGETS, LORA_TARGETS, layer_loop
from jdpo.models.context_attention import CONTEXT_ATTENTION
from jdpo.models.kernels import ATTENTION_CHOICES

REMAT_POLICIES = ("none", "full", "dots_saveable", "offload")
# Attention without a KV cache: `model.attention`, one of `jdpo.models.kernels.ATTENTION_CHOICES` (auto,
# blocked, splash, pallas_gpu, xla); `kernels.resolve_attention` decides what "auto" runs. The KV-cache
# path (`extend`: generation) always takes the dense mask.
ATTENTION_IMPLS = ATTENTION_CHOICES
MOE_DISPATCH = ("ragged", "dense")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run a decoder, as opposed to what it is (`ModelConfig`): dtypes, memory and kernel choices.

    One frozen object handed whole to `Transformer`, `from_pretrained`, `init_model` and on to the layers,
    so a new option is one field here, not a keyword threaded through every call site. None of them
    changes what the model computes, only its precision (dtypes) and how (memory, layout, kernel, tiles):
    results agree to float rounding.
    """

    dtype: Any = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Any = jnp.float32  # dtype the parameters are stored in
    remat: str = "none"  # REMAT_POLICIES: what a layer saves for the backward pass (offload: to host)
    scan_layers: bool = False  # stacked [L, ...] layer parameters run by lax.scan (one compiled layer)
    attention: str = "auto"  # ATTENTION_IMPLS: the kernel without a KV cache (`kernels.resolve_attention`)
    attention_block: int = 0  # positions per tile of the attention kernel; 0: the kernel's default
    # Rows split over the mesh's context axis: how keys / values reach a shard's queries
    # (`jdpo.models.context_attention.CONTEXT_ATTENTION`: auto, all_gather, ring).
    context_attention: str = "auto"
    context: int = 1  # devices each row's tokens are split over (mesh.context): decides what auto runs
    # Low-rank adapters on these projections (`jdpo.models.lora`); unlike the fields above they are weights of
    # their own, zero-effect at initialisation (B = 0). None: no adapters.
    lora: "LoRASpec | None" = None
    # Mixture-of-experts models (`jdpo.models.moe`): how the experts run ("ragged": sorted by expert,
    # grouped matmuls, dropless; "dense": every expert on every token, one-hot combine), and
    # `model.freeze_router` (no gradient into the router).
    moe_dispatch: str = "ragged"
    freeze_router: bool = False

    def __post_init__(self):
        if self.attention_block < 0:
            raise ValueError(
                f"attention_block must be >= 0 (0: the kernel's default), got {self.attention_block}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ValueError(f"moe_dispatch must be one of {MOE_DISPATCH}, got {self.moe_dispatch!r}")
        if self.context_attention not in CONTEXT_ATTENTION:
            raise ValueError(
                f"context_attention must be one of {CONTEXT_ATTENTION}, got {self.context_attention!r}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")

    @classmethod
    def from_section(cls, section, *, dtype, model_config, context: int = 1) -> "ModelOptions":
        """From a run's `model:` config section (read by its field names); `dtype` is its compute dtype
        already resolved (its "auto" depends on the device, see `jdpo.train.trainer.resolve_dtype`);
        `model_config`: the checkpoint's `ModelConfig` (scan_layers and remat "auto" depend on its layers,
        `choices.layer_loop`); `context`: the run's `mesh.context`."""
        scan, remat = layer_loop_of(section, model_config)
        return cls(
            dtype=dtype,
            param_dtype=jnp.dtype(section.param_dtype),
            remat=remat,
            scan_layers=scan,
            attention=section.attention,
            attention_block=section.attention_block,
            freeze_router=section.freeze_router,
            moe_dispatch=section.moe_dispatch,
            context_attention=section.context_attention,
            context=context,
        )


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which projections carry a LoRA adapter and its shape: y = x W + (alpha / rank) x A B, with A
    [*in, r] and B [r, *out] stored as `nnx.LoRAParam` (so they split off from the frozen base)."""

    rank: int
    alpha: float
    # HF module names of the model's projections (PROJECTIONS), then an MoE model's expert projections
    # (EXPERT_TARGETS: one adapter per expert, `jdpo.models.moe.Experts`)
    targets: tuple[str, ...]
    # The frozen base's projection kernels (all of them, adapted or not) stored quantised, "int8" or
    # "nf4" (`jdpo.models.quantize`), and dequantised inside the matmul (QLoRA); "none": param_dtype.
    quantize: str = "none"
    # PEFT's lora_dropout: dropout on the adapter's input x (not on the base path) in training forwards
    # given a dropout key; reference, eval and generation forwards get none.
    dropout: float = 0.0
    site: int = 0  # which projection (PROJECTIONS index): folded into the dropout key

    @property
    def expert_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in EXPERT_TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def for_module(self, name: str) -> "LoRASpec | None":
        return dataclasses.replace(self, site=PROJECTIONS.index(name)) if name in self.targets else None


#: The projections of a decoder layer, by their Hugging Face module names: the seven of every family, then
#: phi3's fused ones (qkv_proj in place of q/k/v_proj, gate_up_proj in place of gate/up_proj).
PROJECTIONS = (*LORA_TARGETS, *FUSED_TARGETS)


def layer_loop_of(section, model_config) -> tuple[bool, str]:
    """A `model:` section's scan_layers and remat resolved for `model_config` (`choices.layer_loop`)."""
    return layer_loop(section.scan_layers, section.remat, num_layers=model_config.num_layers,
                      mixed_layers=model_config.mixes_layer_kinds)  # fmt: skip
