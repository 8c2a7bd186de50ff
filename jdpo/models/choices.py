"""The model's settings rules that `jdpo.config` validates against, without importing JAX.

`jdpo.config` checks a run's settings before anything heavy loads; these rules belong to the model (the
kernels' tile constraints, the projections an adapter may target), so they live here, in a module that
imports nothing, and the config reads them from it.
"""

#: The projections a LoRA adapter may target, by their Hugging Face module names (the default targets).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Fused projections (phi3) and the projections each one stands for: targeting all of the parts targets
#: the fused module (PEFT names it so), and targeting the fused name on an unfused model targets the parts.
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: The experts' stacked projections of an MoE model (qwen3_moe, mixtral, gpt_oss), named as PEFT's
#: target_parameters name transformers' fused 3-D expert parameters (mlp.experts.gate_up_proj): one
#: adapter per expert, gate and up sharing A as in transformers' fused gate_up_proj.
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")


#: `model.scan_layers: auto` scans a model deeper than this: the compile of an unrolled stack grows with
#: its depth (SmolLM2-135M's 30 layers: 23.2 s unrolled, 4.7 s scanned, its train step on 2 CPU cores).
SCAN_LAYERS_ABOVE = 8


def layer_loop(scan_layers: str, remat: str, *, num_layers: int, mixed_layers: bool) -> tuple[bool, str]:
    """`model.scan_layers` and `model.remat` resolved for a model: (scan the layers?, the remat policy).

    scan_layers "auto": scan a model of more than SCAN_LAYERS_ABOVE layers whose layers are all of one kind
    (`mixed_layers`: an MoE model with dense layers cannot be one scanned body). remat "auto": none on an
    unrolled stack, dots_saveable on a scanned one. XLA fuses an unrolled stack's elementwise work into its
    consumers and recomputes it in the backward pass for free; a scanned body instead saves every
    intermediate unless told, which took more memory and time than keeping only the matmul outputs
    (SmolLM2-135M, 3 rows of 256 tokens, float32, 2 CPU cores: temporaries 2.30 GiB and 5.2 s a step
    scanned without remat, 1.21 GiB and 4.5 s with dots_saveable, 1.59 GiB and 4.5 s unrolled).
    """
    if scan_layers == "auto":
        scan = num_layers > SCAN_LAYERS_ABOVE and not mixed_layers
    else:
        scan = scan_layers in (True, "true")
    if remat == "auto":
        remat = "dots_saveable" if scan else "none"
    return scan, remat


def attention_block_problem(kernel: str, block: int) -> str | None:
    """Why `model.attention_block = block` (> 0) does not suit the attention kernel `kernel` (a resolved
    `model.attention`), or None when it does."""
    if kernel == "splash" and block % 128:
        return f"model.attention_block={block} with splash: TPU tiles are multiples of 128"
    if kernel == "pallas_gpu" and block & (block - 1):
        return f"model.attention_block={block} with pallas_gpu: Triton tiles are powers of two"
    return None


#: Kernels that attend a shard of a row's queries (`mesh.context` > 1): the blocked kernel (all-gather or
#: ring), splash and pallas_gpu (the ring, `jdpo.models.ring_pallas`; pallas_gpu through jdpo's own
#: flash kernel, `jdpo.models.flash_gpu`, not jax's).
CONTEXT_KERNELS = ("blocked", "splash", "pallas_gpu")
RING_KERNELS = ("splash", "pallas_gpu")  # the Pallas kernels, which take a context-split row in the ring only


def context_refusal(requested: str, context: int, how: str = "auto") -> str | None:
    """Why `model.attention = requested` with `model.context_attention = how` cannot run rows split over
    `context` devices, or None when it can. `jdpo.config.context` asks it before anything loads,
    `kernels.resolve_attention` when the model is built."""
    if context <= 1:
        return None
    if requested == "xla":
        return (
            f"model.attention=xla cannot run rows split over mesh.context={context}: its dense [T, T] mask "
            "is the whole row's; use auto, blocked or splash"
        )
    if requested in RING_KERNELS and how == "all_gather":
        return (
            f"model.context_attention=all_gather with model.attention={requested} over "
            f"mesh.context={context}: {requested} runs a context-split row in the ring only; use "
            "model.context_attention ring or auto"
        )
    return None


CONTEXT_BALANCE = ("auto", "blocks", "chunks")


def deals_blocks(requested: str, kernel: str, how: str, context: int) -> bool:
    """Whether rows split over `context` devices are dealt in blocks by the host
    (`model.context_balance`, `jdpo.data.context_balance`) for the resolved attention `kernel` with
    `model.context_attention = how`; raises ValueError for blocks where they cannot run (the ring, and
    splash, read the fixed chunk layout)."""
    if requested not in CONTEXT_BALANCE:
        raise ValueError(f"model.context_balance must be one of {list(CONTEXT_BALANCE)}, got {requested!r}")
    if context <= 1 or requested == "chunks":
        return False
    gathers = kernel == "blocked" and how != "ring"
    if requested == "blocks" and not gathers:
        path = f"model.attention={kernel}" if kernel != "blocked" else "model.context_attention=ring"
        raise ValueError(
            f"model.context_balance=blocks over mesh.context={context} with {path}: rows dealt in blocks run "
            "the blocked kernel with the all-gather (model.context_attention all_gather or auto); use "
            "model.context_balance chunks or auto with the ring"
        )
    return gathers
