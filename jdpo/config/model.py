"""The `model` section (the policy checkpoint and how it runs) and the `mesh` section (the devices), with
their rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jdpo.config.fields import ConfigError, setting
from jdpo.models.choices import attention_block_problem


@dataclass(frozen=True)
class ModelSection:
    """The policy model: a Hugging Face checkpoint directory and how to run it."""

    path: str = setting(
        "", "Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto", "Compute dtype; 'auto' is bfloat16 on GPU/TPU and float32 on CPU."
    )
    param_dtype: Literal["float32", "bfloat16"] = setting(
        "float32", "Dtype the parameters (and so the optimizer's update) are stored in."
    )
    remat: Literal["auto", "none", "full", "dots_saveable", "offload"] = setting(
        "auto",
        "Rematerialisation per layer: auto (none on unrolled layers, dots_saveable on scanned ones), none, "
        "full (recompute all), dots_saveable (keep matmul outputs), offload (keep each layer's input in "
        "pinned host memory, recompute the rest).",
    )
    scan_layers: Literal["auto", "true", "false"] = setting(
        "auto",
        "Scan over the layer stack (one compiled layer; fast compiles of deep models); auto: scan models "
        "of more than 8 layers when all their layers are of one kind.",
    )
    attention: Literal["auto", "blocked", "splash", "pallas_gpu", "xla"] = setting(
        "auto",
        "Attention kernel: auto (splash on TPU, pallas_gpu on NVIDIA GPUs unless the model soft-caps or "
        "slides, else blocked; the run log says which), blocked (segment-aware, plain JAX), splash (TPU), "
        "pallas_gpu (NVIDIA GPUs), xla (dense masked).",
    )
    context_attention: Literal["auto", "all_gather", "ring"] = setting(
        "auto",
        "With mesh.context > 1: how a shard's queries reach the row's keys / values: all_gather (gather "
        "k / v, small with grouped-query heads), ring (k / v shards passed around the devices, online "
        "softmax), auto (all_gather).",
    )
    context_balance: Literal["auto", "blocks", "chunks"] = setting(
        "auto",
        "With mesh.context > 1: how a row's causal attention work is balanced over the devices: blocks "
        "(the host deals the row's blocks of tokens so every device gets the same work, whatever the "
        "packed documents' lengths; the all-gather path), chunks (device i holds chunks i and 2C - 1 - i "
        "of the row: even for one document filling the row), auto (blocks where the blocked kernel "
        "gathers k / v, chunks in the ring).",
    )
    attention_block: int = setting(
        0,
        "Positions per tile of the attention kernel; 0: the kernel's default (blocked 64, splash 512, "
        "pallas_gpu 128).",
    )
    router_aux_loss_coef: float | None = setting(
        None,
        "MoE models: weight of the router's load-balancing loss added to the training loss (logged as "
        "aux_loss); unset: the checkpoint's router_aux_loss_coef, else 0.",
    )
    freeze_router: bool = setting(False, "MoE models: no gradient and no update reach the router weights.")
    moe_dispatch: Literal["ragged", "dense"] = setting(
        "ragged",
        "MoE models: ragged (tokens sorted by expert, grouped matmuls, dropless) or dense (every expert on "
        "every token, one-hot combine: E / k times the expert FLOPs; a baseline).",
    )


def check_model(model: ModelSection) -> None:
    block, kernel = model.attention_block, model.attention
    if block < 0:
        raise ConfigError(f"model.attention_block must be >= 0 (0: the kernel's default), got {block}")
    if model.router_aux_loss_coef is not None and not model.router_aux_loss_coef >= 0:
        raise ConfigError(f"model.router_aux_loss_coef must be >= 0, got {model.router_aux_loss_coef}")
    if block and kernel != "auto":  # auto: checked once the kernel is known (`Transformer`)
        if why := attention_block_problem(kernel, block):
            raise ConfigError(why)


@dataclass(frozen=True)
class MeshSection:
    """Device mesh axes; their product must equal the number of devices (-1: all remaining)."""

    data: int = setting(1, "Data-parallel axis (replicated parameters).")
    fsdp: int = setting(-1, "Fully sharded data-parallel axis (parameters and optimizer state sharded).")
    tensor: int = setting(
        1, "Tensor-parallel axis (heads / mlp sharded); use when per-device batch is small."
    )
    expert: int = setting(
        1, "Expert-parallel axis (MoE models: experts sharded over it; it also splits the batch rows)."
    )
    context: int = setting(
        1,
        "Context-parallel axis: every row's tokens split over this many devices (long rows); the row "
        "length must be a multiple of 2 x context.",
    )


def check_mesh(mesh: MeshSection) -> None:
    sizes: dict[str, Any] = {name: getattr(mesh, name) for name in ("data", "fsdp", "tensor", "expert")}
    for name, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1 (all remaining devices), got {v}")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("at most one of mesh.data / mesh.fsdp / mesh.tensor / mesh.expert may be -1")
    if mesh.context < 1:
        raise ConfigError(
            f"mesh.context must be a positive size (1: rows whole on a device), got {mesh.context}"
        )
