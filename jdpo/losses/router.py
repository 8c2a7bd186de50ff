"""The router's load-balancing loss of a mixture-of-experts model (Switch Transformer eqs. 4-6, in the form
`transformers`' `load_balancing_loss_func` computes for Mixtral and Qwen3-MoE), and the experts' load.

Inputs are per-MoE-layer sums over the real tokens of one forward (`jdpo.models.moe.router_stats`):
counts [L, E] (top-k assignments per expert), probs [L, E] (softmax probability per expert), tokens [L].

transformers, given the attention mask, weights every layer's rows by the flat [batch x sequence] mask
(padding excluded) and pools all layers before normalising: with R = (MoE layers) x (real tokens),
f_e = (assignments to e over all layers) / R and P_e = (probability of e over all layers) / R, the loss
is E * sum_e f_e P_e (f sums to k, not 1: it is not divided by top-k). Packed rows' padding is segment 0,
excluded the same way; the segments of a row are all real tokens, as transformers' rows are.
"""

import jax.numpy as jnp


def load_balancing_loss(counts_LxE, probs_LxE, tokens_L):
    """E * sum_e f_e P_e over the pooled layers (float32 scalar; 0 when no token is real)."""
    E = counts_LxE.shape[-1]
    rows = jnp.maximum(jnp.sum(tokens_L), 1.0)
    f_E = jnp.sum(counts_LxE, axis=0) / rows
    p_E = jnp.sum(probs_LxE, axis=0) / rows
    return E * jnp.sum(f_E * p_E)


def expert_load(counts_LxE):
    """Per layer and expert, its share of the layer's assignments times E: 1 everywhere when balanced
    (`moe/expert_load_max` / `moe/expert_load_min` are its extremes)."""
    E = counts_LxE.shape[-1]
    return E * counts_LxE / jnp.maximum(jnp.sum(counts_LxE, axis=-1, keepdims=True), 1.0)
