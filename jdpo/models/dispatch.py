"""How an MoE layer runs its experts on the router's choices: `ragged_experts` (sorted by expert, grouped
matmuls: dropless, k experts per token) and `dense_experts` (every expert on every token, one-hot combine).
Both take x [M, D], the chosen experts [M, k] and their weights [M, k], the stacked kernels (a dict of
[E, ...] arrays) and the expert function (`expert_mlp` with its activation bound), and return [M, D].

The expert function is written once against two operations, so both dispatches (and the expert-parallel
one, `jdpo.models.expert_parallel`) run the same expert: `matmul(x, w)` (x's rows times their expert's
kernel w [E, in, *out]) and `bias_of(b)` (their expert's bias from b [E, *out])."""

import jax
import jax.numpy as jnp

from jdpo.models import quantize as quantization

SWIGLU_ALPHA = 1.702  # gpt_oss's clamped SwiGLU: gate * sigmoid(alpha * gate)

#: The stacked expert kernels a quantised base stores as codes (`lora.quantize`; biases stay float), with
#: their number of output axes (gpt_oss's gate_up_proj [E, D, F, 2]: two).
QUANTIZED_KERNELS = {"gate_proj": 1, "up_proj": 1, "gate_up_proj": 2, "down_proj": 1}


def expert_mlp(
    kernels: dict, x, matmul, bias_of, *, act: str, limit: float | None, lora_scale=None, quantize="none"
):  # fmt: skip
    """One gated expert on rows x: down(act(gate x) * up x). gpt_oss (`limit`): gate and up interleaved
    in one kernel [E, D, F, 2] with biases, gate clamped above at `limit`, up to +-limit, and
    (up + 1) * gate * sigmoid(1.702 gate); the output projection has a bias. Per-expert LoRA adapters
    (`kernels["gate_up_proj_lora_a"]` [E, D, r] and `_lora_b` [E, r, 2, F] (gpt_oss [E, r, F, 2]), likewise
    down_proj's) add lora_scale (x A_e) B_e to their projection: two more grouped matmuls, no merged
    kernel. `quantize` (int8 / nf4, QLoRA): the kernels are codes with their scales under <name>_scale,
    dequantised here to x's dtype (inside the expert-parallel shard_map: the device's own experts)."""

    def kernel(name):
        w = kernels[name]
        if quantize == "none":
            return w
        scale, n_out = kernels[f"{name}_scale"], QUANTIZED_KERNELS[name]
        return quantization.dequantize(w, scale, quantize, n_in=1, n_out=n_out, dtype=x.dtype)

    def adapter(name, x):
        if f"{name}_lora_a" not in kernels:
            return None
        xa = matmul(x, kernels[f"{name}_lora_a"])
        return matmul(xa, kernels[f"{name}_lora_b"]) * jnp.asarray(lora_scale, xa.dtype)

    if limit is None:
        gate, up = matmul(x, kernel("gate_proj")), matmul(x, kernel("up_proj"))
        if (d := adapter("gate_up_proj", x)) is not None:
            gate, up = gate + d[..., 0, :], up + d[..., 1, :]
        gate = jax.nn.silu(gate) if act == "silu" else jax.nn.gelu(gate, approximate=True)
        h = gate * up
        y = matmul(h, kernel("down_proj"))
        return y if (d := adapter("down_proj", h)) is None else y + d
    gate_up = matmul(x, kernel("gate_up_proj")) + bias_of(kernels["gate_up_proj_bias"])
    if (d := adapter("gate_up_proj", x)) is not None:
        gate_up = gate_up + d
    gate = jnp.minimum(gate_up[..., 0], limit)
    up = jnp.clip(gate_up[..., 1], -limit, limit)
    h = (up + 1) * (gate * jax.nn.sigmoid(gate * SWIGLU_ALPHA))
    y = matmul(h, kernel("down_proj")) + bias_of(kernels["down_proj_bias"])
    return y if (d := adapter("down_proj", h)) is None else y + d


def _as_3d(op, x, w):
    """`op(x, w3)` with w [E, in, *out] flattened to [E, in, prod(out)] and the result unflattened."""
    y = op(x, w.reshape(w.shape[0], w.shape[1], -1))
    return y.reshape(*y.shape[:-1], *w.shape[2:])


def ragged_experts(x_MxD, experts_MxK, weights_MxK, kernels, expert_fn, num_experts: int):
    """Dropless dispatch: the assignments sorted by expert, one grouped matmul per projection
    (`jax.lax.ragged_dot`), unsorted, weighted and summed over k -> [M, D]. An assignment to expert
    `num_experts` (another device's expert: `jdpo.models.expert_parallel`) sorts past every group, where
    ragged_dot leaves zeros; its output is dropped."""
    M, K = experts_MxK.shape
    flat_A = experts_MxK.reshape(-1)  # A = M k assignments, token-major
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_E = jnp.bincount(flat_A, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    row_expert_A = flat_A[order_A]
    xs_AxD = x_MxD[order_A // K]

    def matmul(x, w):
        return _as_3d(lambda a, b: jax.lax.ragged_dot(a, b, sizes_E), x, w)

    def bias_of(b):
        return b[jnp.minimum(row_expert_A, num_experts - 1)]

    ys_AxD = expert_fn(kernels, xs_AxD, matmul, bias_of)
    ys_AxD = jnp.where((row_expert_A < num_experts)[:, None], ys_AxD, jnp.zeros((), ys_AxD.dtype))
    y_MxKxD = ys_AxD[jnp.argsort(order_A)].reshape(M, K, -1)
    return jnp.einsum("MKD,MK->MD", y_MxKxD, weights_MxK.astype(y_MxKxD.dtype))


def dense_experts(x_MxD, experts_MxK, weights_MxK, kernels, expert_fn, num_experts: int):
    """Every expert on every token, combined with one-hot weights -> [M, D] (E / k times the FLOPs)."""
    combine_MxE = jnp.einsum(
        "MKE,MK->ME",
        jax.nn.one_hot(experts_MxK, num_experts, dtype=x_MxD.dtype),
        weights_MxK.astype(x_MxD.dtype),
    )
    xs_ExMxD = jnp.broadcast_to(x_MxD, (num_experts, *x_MxD.shape))

    def matmul(x, w):
        return _as_3d(lambda a, b: jnp.einsum("EMI,EIO->EMO", a, b), x, w)

    def bias_of(b):
        return b[:, None]

    y_ExMxD = expert_fn(kernels, xs_ExMxD, matmul, bias_of)
    return jnp.einsum("EMD,ME->MD", y_ExMxD, combine_MxE)


DISPATCH = {"ragged": ragged_experts, "dense": dense_experts}
