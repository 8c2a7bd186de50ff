"""How an MoE layer runs its experts on the router's choices: `ragged_experts` (sorted by expert, grouped
matmuls: dropless, k experts per token) and `dense_experts` (every expert on every token, one-hot combine).
Both take x [M, D], the chosen experts [M, k] and their weights [M, k] and the stacked kernels (gate, up
[E, D, F], down [E, F, D]) and return [M, D]."""

import jax
import jax.numpy as jnp


def ragged_experts(x_MxD, experts_MxK, weights_MxK, kernels, act, num_experts: int):
    """Dropless dispatch: the assignments sorted by expert, one grouped matmul per projection
    (`jax.lax.ragged_dot`), unsorted, weighted and summed over k -> [M, D]. An assignment to expert
    `num_experts` (another device's expert: `jdpo.models.expert_parallel`) sorts past every group, and
    ragged_dot leaves such rows zero."""
    gate_ExDxF, up_ExDxF, down_ExFxD = kernels
    M, K = experts_MxK.shape
    flat_A = experts_MxK.reshape(-1)  # A = M k assignments, token-major
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_E = jnp.bincount(flat_A, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    xs_AxD = x_MxD[order_A // K]
    h_AxF = act(jax.lax.ragged_dot(xs_AxD, gate_ExDxF, sizes_E)) * jax.lax.ragged_dot(xs_AxD, up_ExDxF, sizes_E)
    ys_AxD = jax.lax.ragged_dot(h_AxF, down_ExFxD, sizes_E)
    y_MxKxD = ys_AxD[jnp.argsort(order_A)].reshape(M, K, -1)
    return jnp.einsum("MKD,MK->MD", y_MxKxD, weights_MxK.astype(y_MxKxD.dtype))


def dense_experts(x_MxD, experts_MxK, weights_MxK, kernels, act, num_experts: int):
    """Every expert on every token, combined with one-hot weights -> [M, D] (E / k times the FLOPs)."""
    gate_ExDxF, up_ExDxF, down_ExFxD = kernels
    combine_MxE = jnp.einsum(
        "MKE,MK->ME", jax.nn.one_hot(experts_MxK, num_experts, dtype=x_MxD.dtype), weights_MxK.astype(x_MxD.dtype)
    )
    gate_MxExF = jnp.einsum("MD,EDF->MEF", x_MxD, gate_ExDxF)
    h_MxExF = act(gate_MxExF) * jnp.einsum("MD,EDF->MEF", x_MxD, up_ExDxF)
    y_MxExD = jnp.einsum("MEF,EFD->MED", h_MxExF, down_ExFxD)
    return jnp.einsum("MED,ME->MD", y_MxExD, combine_MxE)


DISPATCH = {"ragged": ragged_experts, "dense": dense_experts}
