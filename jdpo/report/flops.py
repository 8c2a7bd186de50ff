"""FLOPs and MFU accounting: model FLOPs of a step, the devices' peak FLOP/s, and throughput metrics.

Model FLOPs credit useful work only: ``2 x`` the matmul parameters per computed token (a shared prompt
once), plus attention over the (query, key) pairs the mask lets each query see (not ``T^2``);
rematerialisation is not counted. ``cfg`` is a ``jdpo.models.ModelConfig`` or a Hugging Face config
(dict or object). The token accounting is :func:`token_counts`, the one place every figure comes from:

    counts = token_counts(host_batches, sliding_window=w).over_processes()  # tokens, slots, keys, ...
    flops = train_flops(cfg, tokens=counts.tokens, attended_keys=counts.attended_keys)
    throughput_metrics(step_time=dt, tokens=counts.tokens, slots=counts.slots, flops=flops,
                       peak_flops=total_peak_flops())

The peak is the published bf16 dense figure for known accelerators and, on CPU, the measured float32
matmul rate of this host. No JAX at import time: only the peak functions import it, when called.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from functools import cache
from typing import Any

from jdpo.models.config import ModelConfig
from jdpo.parallel import distributed
from jdpo.report.metrics import MFU, PADDING_FRACTION, STEP_TIME, TOKENS_PER_SEC


def _dims(cfg: Any) -> tuple[int, int, int, int, int, int, int]:
    """(L, D, F, N, K, H, V) from a ``jdpo.models.ModelConfig`` (``num_layers``, ``num_heads``,
    ``num_kv_heads``) or a Hugging Face config dict / object (``num_hidden_layers``, ...)."""

    def get(*names: str) -> Any:
        for name in names:
            value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
            if value is not None:
                return value
        return None

    L = get("num_layers", "num_hidden_layers")
    D = get("hidden_size")
    N = get("num_heads", "num_attention_heads")
    K = get("num_kv_heads", "num_key_value_heads") or N
    H = get("head_dim") or D // N
    return L, D, get("intermediate_size"), N, K, H, get("vocab_size")


def matmul_params(cfg: Any) -> int:
    """Parameters that take part in a matmul for every token: per layer the q/k/v/o projections and
    the gated MLP (3 matrices), plus the unembedding. The input embedding is a lookup (no FLOPs)
    and norms and biases are element-wise, so neither is counted. For Llama-3-8B this is
    7,504,658,432 of its 8,030,261,248 parameters. ``cfg``: see :func:`_dims`; a mixture of experts counts
    the experts a token runs (:func:`_mlp_matmul_params`)."""
    L, D, F, N, K, H, V = _dims(cfg)
    per_layer = D * N * H + 2 * D * K * H + N * H * D
    return L * per_layer + _mlp_matmul_params(cfg, L, D, F) + D * V


def _mlp_matmul_params(cfg: Any, L: int, D: int, F: int) -> int:
    """The MLPs' matmul parameters per token: 3 D F a layer; an MoE layer (a `ModelConfig` with experts)
    its router (D E) and the k experts a token runs (3 D F_e k), not all E: the active parameters, so the
    MFU of an MoE model credits the work it does."""
    if isinstance(cfg, Mapping) and (cfg.get("num_experts") or cfg.get("num_local_experts")):
        cfg = ModelConfig.from_hf(dict(cfg))  # a HF config.json of an MoE family: its expert fields
    experts = getattr(cfg, "expert_layers", None)
    if not experts or not getattr(cfg, "num_experts", 0):
        return L * 3 * D * F
    moe = sum(experts)
    routed = D * cfg.num_experts + 3 * D * cfg.moe_intermediate_size * cfg.experts_per_token
    return (L - moe) * 3 * D * F + moe * routed


def _attention_flops_per_key(cfg: Any) -> float:
    """Forward FLOPs per causal (query, key) pair: ``Q K^T`` and ``P V`` each cost ``2 * N * H``
    per pair per layer."""
    L, _, _, N, _, H, _ = _dims(cfg)
    return 4.0 * L * N * H


def forward_flops(cfg: Any, *, tokens: int, attended_keys: int, head_tokens: int | None = None) -> float:
    """Model FLOPs of one forward pass over ``tokens`` computed tokens.

    ``2 * matmul_params`` per token (a multiply and an add per weight), plus attention,
    ``4 * L * N * H`` per visible (query, key) pair (see :func:`attended_keys`).
    Counting the causal pairs rather than ``T^2`` credits the useful work only; a kernel that also
    computes the masked half is not credited for it.

    ``head_tokens``: when given, the ``D x V`` unembedding is credited on that many tokens instead of
    all ``tokens``: ``2 * (matmul_params - D * V) * tokens + 2 * D * V * head_tokens + attention``.
    DPO needs logits only where a completion token is scored (``loss_mask > 0``), and jdpo projects
    only those positions, so ``head_tokens = scored`` gives the stricter figure that does not credit
    the head on prompt tokens.
    """
    _, D, _, _, _, _, V = _dims(cfg)
    head = D * V
    if head_tokens is None:
        head_tokens = tokens
    return (
        2.0 * (matmul_params(cfg) - head) * tokens
        + 2.0 * head * head_tokens
        + _attention_flops_per_key(cfg) * attended_keys
    )


def train_flops(
    cfg: Any,
    *,
    tokens: int,
    attended_keys: int,
    reference_forward: bool = False,
    head_tokens: int | None = None,
    lora_params: int | None = None,
) -> float:
    """Model FLOPs of one training step over ``tokens`` non-pad tokens: forward + backward = 3x the
    forward (the backward computes gradients for activations and weights, 2x), i.e. ``6 N`` per token
    plus ``12 L N H`` per attended key. ``reference_forward=True`` adds one forward pass of the frozen
    reference model (``reference.mode: online``); a cached reference costs nothing per step.
    ``head_tokens``: credit the unembedding on that many tokens only (see :func:`forward_flops`).
    ``lora_params``: a LoRA run with that many adapter weights. The frozen weights get no gradient, so
    their matmuls cost the forward and the activations' gradient, 2x the forward (``4 N`` per token);
    attention stays 3x; each adapter weight costs ``6`` per token like a trained one.
    Rematerialisation is not counted: MFU credits model FLOPs, not recomputation."""
    fwd = forward_flops(cfg, tokens=tokens, attended_keys=attended_keys, head_tokens=head_tokens)
    ref = fwd if reference_forward else 0.0
    if lora_params is None:
        return 3.0 * fwd + ref
    attention = _attention_flops_per_key(cfg) * attended_keys
    return 2.0 * (fwd - attention) + 3.0 * attention + 6.0 * lora_params * tokens + ref


def flops_per_token(cfg: Any, seq_len: int, *, training: bool = True) -> float:
    """Average model FLOPs per token of unpacked, unpadded sequences of ``seq_len`` tokens: the
    common ``6 N + 12 L N H T`` estimate, but with the causal average of ``(T + 1) / 2`` keys per
    query instead of ``T``. ``training=False`` gives the forward-only figure (``2 N + ...``)."""
    fwd = forward_flops(cfg, tokens=1, attended_keys=0) + _attention_flops_per_key(cfg) * (seq_len + 1) / 2
    return 3.0 * fwd if training else fwd


def attended_keys(segment_ids, *, sliding_window: int | None = None) -> int:
    """(query, key) pairs a batch's queries may see, per layer and query head: what MFU credits for
    attention. The rule of `jdpo.models.masks.AttentionMask`, counted host-side for every non-pad query
    (segment id != 0): the keys of its own segment at or before it, and for a branch (segment s > 0) every
    key of its shared prefix -(ceil(s / 2)) before it (the shared-prompt layout; absent in plain rows);
    with ``sliding_window``, only keys fewer than that many row slots back (the mask's window; the
    shared-prompt layout is never given a window, `jdpo.models.kernels.shares_prompt`).
    ``segment_ids``: [B, T] integers (NumPy, host-side) from the data path. O(B T log(B T)): one sort
    and two binary searches per query, never a [T, T] mask."""
    import numpy as np

    seg = np.asarray(segment_ids, dtype=np.int64)
    B, T = seg.shape
    if seg.size == 0 or not np.any(seg):
        return 0
    # Group (row, segment id) -> g; a key's sort code g * T + t orders keys by group, then position.
    lo_id, hi_id = int(seg.min()), int(seg.max())
    span = hi_id - lo_id + 1
    row = np.arange(B, dtype=np.int64)[:, None]
    t = np.arange(T, dtype=np.int64)[None, :]
    codes = np.sort(((row * span + seg - lo_id) * T + t).ravel())

    def keys_of(group, first):
        """Keys of `group` at positions in [first, t], per query."""
        last = np.searchsorted(codes, group * T + t, "right")
        return last - np.searchsorted(codes, group * T + first, "left")

    first = np.zeros_like(t) if not sliding_window else np.maximum(t - sliding_window + 1, 0)
    own = keys_of(row * span + seg - lo_id, first)
    prefix_id = -((seg + 1) // 2)  # segment 2k + 1 and 2k + 2 see -(k + 1) (`masks.prefix`)
    has_prefix = (seg > 0) & (prefix_id >= lo_id)
    shared = np.where(has_prefix, keys_of(row * span + np.maximum(prefix_id, lo_id) - lo_id, first), 0)
    return int(np.sum(np.where(seg != 0, own + shared, 0)))


def computed_attention_keys(kernel: str, segment_ids, *, tile: int, sliding_window: int | None = None) -> int:
    """(query, key) score pairs an attention kernel computes over a batch, per layer and query head:
    what attention costs, where :func:`attended_keys` is what MFU credits. ``segment_ids``: [B, T]
    (host-side); ``kernel``: a resolved ``model.attention`` (``jdpo.models.kernels``); ``tile``: its tile.

    - ``xla``: every (query, key) of each row, T^2 (dense masked attention);
    - ``pallas_gpu``, ``splash``: whole tiles up to the diagonal, on rows padded to a multiple of the
      tile; splash drops the tiles its local mask empties (sliding window), neither skips a tile for
      its segment ids (they are data inside the computed tiles);
    - ``blocked``: per query tile, the key tiles from the first one any of its queries can see (its
      segment's start, or the window) to the diagonal, and before those the tiles of its queries'
      shared prefix (the shared-prompt layout: a branch's prompt); rows padded to a multiple of the tile.
    """
    import numpy as np

    seg = np.asarray(segment_ids)
    B, T = seg.shape
    if kernel == "xla":
        return B * T * T
    nt = -(-T // tile)
    i, j = np.arange(nt)[:, None], np.arange(nt)[None, :]
    causal = j <= i
    if kernel in ("pallas_gpu", "splash"):
        tiles = causal
        if kernel == "splash" and sliding_window is not None and sliding_window < T:
            # The closest (query, key) of tiles (i, j) are i * tile and j * tile + tile - 1.
            tiles = tiles & (np.maximum(0, (i - j) * tile - tile + 1) < sliding_window)
        return B * int(tiles.sum()) * tile * tile
    if kernel != "blocked":
        raise ValueError(f"kernel must be xla, pallas_gpu, splash or blocked, got {kernel!r}")
    Tp = nt * tile
    padded = np.zeros((B, Tp), seg.dtype)
    padded[:, :T] = seg
    t = np.arange(Tp)
    total = 0
    for row in padded:
        # lo: the earliest key a query sees of its own segment: the segment's first position (padding:
        # itself), the window; [pfirst, plast]: its shared prefix (-(k + 1) for segments 2k + 1, 2k + 2).
        ids = {int(s): np.flatnonzero(row == s) for s in np.unique(row[row != 0])}
        lo = np.array([ids[int(s)][0] if s != 0 else k for k, s in enumerate(row)])
        if sliding_window is not None:
            lo = np.maximum(lo, t - sliding_window + 1)
        b0 = lo.reshape(nt, tile).min(axis=1) // tile
        total += int(np.sum(np.arange(nt) - b0 + 1))
        prefix = [ids.get(-((int(s) + 1) // 2)) if s > 0 else None for s in row]
        for i in range(nt):
            spans = [x for x in prefix[i * tile : (i + 1) * tile] if x is not None]
            if spans:
                a0 = min(int(x[0]) for x in spans) // tile
                a1 = min(max(int(x[-1]) for x in spans) // tile, b0[i] - 1)
                total += max(int(a1 - a0) + 1, 0)
    return total * tile * tile


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """The token accounting of a set of host-side batches, the one input of every throughput figure
    (`jdpo bench`, the train records, experiments/bench/vs_trl.py).

    tokens: positions the forward computes (segment id != 0): a plain pair's prompt twice (once per
      sequence), a shared prompt (`data.shared_prompt`) once, like every row slot it occupies;
    slots: B * T of every batch, so ``padding_fraction = 1 - tokens / slots``;
    attended_keys: the (query, key) pairs the mask lets the queries see (:func:`attended_keys`);
    scored: positions with ``loss_mask`` > 0, the completion tokens whose logits DPO needs;
    pairs: filled pair slots (``pair_ids`` >= 0; a rated example of the unpaired kind is one slot).
    """

    tokens: int = 0
    slots: int = 0
    attended_keys: int = 0
    scored: int = 0
    pairs: int = 0

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.slots if self.slots else 0.0

    def over_processes(self) -> TokenCounts:
        """The global counts: every process's summed (a collective, like
        `jdpo.parallel.distributed.sum_over_processes`; call it on every process). The collective sums
        int32, and a large step's attended keys pass 2^31: each count crosses in base-2^20 digits."""

        if distributed.process_count() == 1:
            return self
        digits = [(x >> shift) & (_DIGIT - 1) for x in self.astuple() for shift in (40, 20, 0)]
        summed = [int(d) for d in distributed.sum_over_processes(digits)]
        return TokenCounts(*(sum(d << shift for d, shift in zip(summed[i : i + 3], (40, 20, 0), strict=True))
                             for i in range(0, len(summed), 3)))  # fmt: skip


_DIGIT = 1 << 20  # a digit's sum over up to 2048 processes stays below 2^31


def token_counts(
    batches: Any, *, sliding_window: int | None = None, sliding_layers: tuple[bool, ...] | None = None
) -> TokenCounts:
    """The :class:`TokenCounts` of one host-side batch (a `jdpo.data.batch.Batch` or a mapping with its
    ``segment_ids``, ``loss_mask`` and, for ``pairs``, ``pair_ids``) or of an iterable of them, summed.
    This host's rows only: `TokenCounts.over_processes` gives the global batch's.

    ``sliding_layers`` (per layer: does it slide? `ModelConfig.sliding_layers`): with a mix of sliding
    and full layers (gemma2 / 3, olmo3) the attended keys are the per-layer mean, the window's count on
    the sliding layers and the full causal count on the others (FLOPs credit keys per layer)."""
    import numpy as np

    from jdpo.parallel.context_layout import natural_order  # imports JAX: only when called

    if sliding_window and sliding_layers and not all(sliding_layers):
        full = token_counts(batches)
        if not any(sliding_layers):
            return full
        windowed = token_counts(batches, sliding_window=sliding_window)
        n, slide = len(sliding_layers), sum(sliding_layers)
        keys = (slide * windowed.attended_keys + (n - slide) * full.attended_keys) // n
        return dataclasses.replace(full, attended_keys=keys)

    if isinstance(batches, Mapping) or hasattr(batches, "segment_ids"):
        batches = [batches]
    total = TokenCounts()
    for batch in batches:
        if "loss_mask" not in batch:
            raise KeyError(f"token_counts needs 'loss_mask' in the batch; it has {sorted(batch)}")
        # Rows dealt over the context axis in blocks are counted in their natural order.
        seg = natural_order(batch["segment_ids"], batch["slots"] if "slots" in batch else None)
        total += TokenCounts(
            tokens=int(np.sum(seg != 0)),
            slots=int(seg.size),
            attended_keys=attended_keys(seg, sliding_window=sliding_window),
            scored=int(np.sum(np.asarray(batch["loss_mask"]) > 0)),
            pairs=int(np.sum(np.asarray(batch["pair_ids"]) >= 0)) if "pair_ids" in batch else 0,
        )
    return total


# Published dense (no sparsity) bf16 peaks per JAX device, matched against ``device.device_kind``
# in order (so "H100 PCIe" is tested before "H100" and "v5 lite" before "v5"). TPU v2/v3 expose each
# TensorCore as a device (half a chip); v4, v5p (megacore) and v5e, v6e expose one device per chip.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12),  # also GH200: the same tensor cores as H100 SXM
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("tpu v2", 22.5e12),  # per TensorCore (45 per chip)
    ("tpu v3", 61.5e12),  # per TensorCore (123 per chip)
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


@cache
def measured_cpu_peak_flops(n: int = 1024, min_seconds: float = 0.2) -> float:
    """FLOP/s of a float32 ``[n, n] @ [n, n]`` jnp matmul on this host's CPU, best of several runs
    (at least 3, and at least ``min_seconds`` of timing). Cached per process. This is the honest
    denominator for CPU MFU: what XLA's CPU matmul actually reaches here, not a datasheet figure."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()  # compile
    best, spent, runs = math.inf, 0.0, 0
    while runs < 3 or spent < min_seconds:
        t0 = time.perf_counter()
        f(a).block_until_ready()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return 2.0 * n**3 / best


def device_peak_flops(device: Any) -> float | None:
    """Peak FLOP/s of one JAX device: the published bf16 dense figure for known accelerators, the
    measured matmul rate for CPU, None when unknown (MFU is then not reported rather than guessed)."""
    if device.platform == "cpu":
        return measured_cpu_peak_flops()
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


def total_peak_flops(devices: list[Any] | None = None) -> float | None:
    """Peak FLOP/s of all ``devices`` (default ``jax.devices()``) together.

    CPU devices on one host share its cores (``jax_num_cpu_devices`` only simulates more), so CPU
    counts one measured peak per process, not per device."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        return None
    if all(d.platform == "cpu" for d in devices):
        return measured_cpu_peak_flops() * len({d.process_index for d in devices})
    peaks = [device_peak_flops(d) for d in devices]
    return None if any(p is None for p in peaks) else float(sum(peaks))


def throughput_metrics(
    *, step_time: float, tokens: int, slots: int, flops: float | None = None, peak_flops: float | None = None
) -> dict[str, float]:
    """``step_time``, ``tokens_per_sec``, ``padding_fraction`` and (when FLOPs and a peak are known)
    ``mfu`` for one step (or an average over a logging interval: pass the sums and total time)."""
    out = {
        STEP_TIME: step_time,
        TOKENS_PER_SEC: tokens / step_time if step_time > 0 else 0.0,
        PADDING_FRACTION: 1.0 - tokens / slots if slots else 0.0,
    }
    if flops is not None and peak_flops and step_time > 0:
        out[MFU] = flops / (step_time * peak_flops)
    return out
