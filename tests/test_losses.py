"""Tests for jdpo.losses: closed forms for every loss type, stability, gradients, and the log-prob paths.

Expected values are computed here with numpy / math from the papers' formulas, independently of the
implementation. Shapes are tiny so that compilation (not compute) dominates; keep it that way.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from jax.test_util import check_grads

from jdpo import losses as L

# ------------------------------------------------------------------------------------------------------------
# Hand-computed references (float64 numpy)
# ------------------------------------------------------------------------------------------------------------

BETA = 0.5
# Four pairs; the last has a large positive margin (hinge = 0 there). No ties in pc - pr, rc - rr, pc - rc or
# pr - rr and no hinge kink nearby, so finite differences are well defined.
PC = np.array([-1.0, -4.0, -2.5, -1.0])
PR = np.array([-2.0, -3.0, -6.0, -9.0])
RC = np.array([-1.5, -3.5, -2.2, -2.0])
RR = np.array([-1.8, -3.2, -5.0, -4.0])
LC = np.array([2.0, 4.0, 5.0, 1.0])
LR = np.array([3.0, 2.0, 4.0, 6.0])


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def smoothed(x, eps):
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


Z = (PC - PR) - (RC - RR)
CR, RL = PC - RC, PR - RR
ZN = (PC / LC - PR / LR) - (RC / LC - RR / LR)


def _aot_expected(first, second):
    # Loss at rank k belongs to the pair with the k-th smallest `first`.
    order = np.argsort(first)
    out = np.empty_like(first)
    out[order] = smoothed(BETA * (np.sort(first) - np.sort(second)), 0.0)
    return out


def _orpo_expected():
    pcn, prn = PC / LC, PR / LR
    log_odds = (pcn - prn) - (np.log(1 - np.exp(pcn)) - np.log(1 - np.exp(prn)))
    return -pcn - BETA * logsig(log_odds)


# loss_type -> (extra kwargs, expected per-pair losses)
EXPECTED = {
    "sigmoid": ({"label_smoothing": 0.1}, smoothed(BETA * Z, 0.1)),
    "reverse_kl": ({}, -logsig(BETA * Z)),
    "forward_kl": ({}, -logsig(BETA * (np.exp(-RL) - np.exp(-CR)))),
    "js_divergence": ({}, -logsig(BETA * (Z - softplus(CR) + softplus(RL)))),
    "alpha_divergence": ({"f_alpha": 0.5}, -logsig(BETA * (np.exp(-0.5 * RL) - np.exp(-0.5 * CR)) / 0.5)),
    "robust": ({"label_smoothing": 0.2}, (0.8 * -logsig(BETA * Z) - 0.2 * -logsig(-BETA * Z)) / 0.6),
    "hinge": ({}, np.maximum(0.0, 1 - BETA * Z)),
    "ipo": ({}, (ZN - 1 / (2 * BETA)) ** 2),
    "sigmoid_norm": ({}, -logsig(BETA * ZN)),
    "dpo_norm": ({}, -logsig(BETA * ZN)),
    "exo_pair": (
        {},
        sig(BETA * Z) * (logsig(BETA * Z) - math.log(1 - 1e-3))
        + sig(-BETA * Z) * (logsig(-BETA * Z) - math.log(1e-3)),
    ),
    "nca_pair": ({}, -logsig(BETA * CR) - 0.5 * logsig(-BETA * CR) - 0.5 * logsig(-BETA * RL)),
    "bco_pair": ({"bco_delta": 0.1}, -logsig(BETA * CR - 0.1) - logsig(-(BETA * RL - 0.1))),
    "sppo_hard": ({}, (CR - 1 / (2 * BETA)) ** 2 + (RL + 1 / (2 * BETA)) ** 2),
    "aot": ({}, _aot_expected(PC - PR, RC - RR)),
    "aot_unpaired": ({}, _aot_expected(CR, RL)),
    "apo_zero": ({}, 1 - sig(BETA * CR) + sig(BETA * RL)),
    "apo_down": ({}, sig(BETA * CR) + 1 - sig(BETA * (CR - RL))),
    "discopop": (
        {"discopop_tau": 0.05},
        -logsig(BETA * Z) * (1 - sig(BETA * Z / 0.05)) + np.exp(-BETA * Z) * sig(BETA * Z / 0.05),
    ),
    "sft": ({}, -PC / LC),
    "simpo": ({"simpo_gamma": 0.3}, -logsig(BETA * (PC / LC - PR / LR) - 0.3)),
    "orpo": ({}, _orpo_expected()),
}


def _args(dtype=jnp.float32):
    return tuple(jnp.asarray(x, dtype) for x in (PC, PR, RC, RR))


def _lengths():
    return {"chosen_lengths": jnp.asarray(LC), "rejected_lengths": jnp.asarray(LR)}


# ------------------------------------------------------------------------------------------------------------
# dpo_loss: values
# ------------------------------------------------------------------------------------------------------------


def test_every_loss_type_has_a_closed_form_test():
    assert set(EXPECTED) == set(L.LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_closed_form(loss_type):
    kw, expected = EXPECTED[loss_type]
    per_pair, _ = L.dpo_loss(*_args(), beta=BETA, loss_type=loss_type, reduction="none", **_lengths(), **kw)
    np.testing.assert_allclose(per_pair, expected, rtol=1e-5, atol=1e-5)
    mean, _ = L.dpo_loss(*_args(), beta=BETA, loss_type=loss_type, **_lengths(), **kw)
    np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5, atol=1e-5)
    total, _ = L.dpo_loss(*_args(), beta=BETA, loss_type=loss_type, reduction="sum", **_lengths(), **kw)
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-5, atol=1e-5)


def test_policy_equals_reference_gives_ln2_and_zero_rewards():
    x_BxP = jnp.asarray([[-3.0, -7.5], [-0.2, -40.0]])
    y_BxP = jnp.asarray([[-1.0, -2.0], [-9.0, -1.5]])
    loss, m = L.dpo_loss(x_BxP, y_BxP, x_BxP, y_BxP, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(m[k]) == 0.0, k
    np.testing.assert_allclose(m["logps/chosen"], np.mean([-3.0, -7.5, -0.2, -40.0]), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], np.mean([-1.0, -2.0, -9.0, -1.5]), rtol=1e-6)


def test_metrics_values():
    _, m = L.dpo_loss(*_args(), beta=BETA)
    np.testing.assert_allclose(m["rewards/chosen"], np.mean(BETA * CR), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], np.mean(BETA * RL), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], np.mean(BETA * Z), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(CR > RL), rtol=1e-6)
    # ipo's rewards use the length-normalised log-probs it trains on (as TRL).
    _, m = L.dpo_loss(*_args(), beta=BETA, loss_type="ipo", **_lengths())
    np.testing.assert_allclose(m["rewards/chosen"], np.mean(BETA * (PC - RC) / LC), rtol=1e-6)
    # Reference-free: beta * average log-prob.
    _, m = L.dpo_loss(jnp.asarray(PC), jnp.asarray(PR), loss_type="simpo", beta=BETA, **_lengths())
    np.testing.assert_allclose(m["rewards/rejected"], np.mean(BETA * PR / LR), rtol=1e-6)
    _, m = L.dpo_loss(*_args(), beta=BETA, reduction="none")
    np.testing.assert_allclose(m["rewards/margins"], BETA * Z, rtol=1e-6)


def test_aot_per_pair_attribution_follows_sorted_policy_margin():
    # Separately checked by the closed form; here the mean must not depend on the input order.
    perm = np.array([2, 0, 3, 1])
    a, _ = L.dpo_loss(*_args(), beta=BETA, loss_type="aot")
    b, _ = L.dpo_loss(*(x[perm] for x in _args()), beta=BETA, loss_type="aot")
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sft", "simpo", "orpo"])
def test_reference_free_losses_need_no_reference(loss_type):
    kw, expected = EXPECTED[loss_type]
    loss, _ = L.dpo_loss(jnp.asarray(PC), jnp.asarray(PR), beta=BETA, loss_type=loss_type, **_lengths(), **kw)
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)


def test_orpo_without_nll_and_metrics():
    loss, m = L.dpo_loss(
        jnp.asarray(PC), jnp.asarray(PR), beta=BETA, loss_type="orpo", orpo_include_nll=False, **_lengths()
    )
    np.testing.assert_allclose(loss, np.mean(_orpo_expected() + PC / LC), rtol=1e-5)
    assert "log_odds_ratio" in m and "log_odds_chosen" in m


def test_label_smoothing_symmetry():
    pc, pr, rc, rr = _args()
    for eps in (0.0, 0.1, 0.3):
        a, _ = L.dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=eps, reduction="none")
        b, _ = L.dpo_loss(pr, pc, rr, rc, beta=BETA, label_smoothing=1.0 - eps, reduction="none")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_combination_is_weighted_sum():
    types, mix = ("sigmoid", "sft", "ipo"), (1.0, 0.5, 2.0)
    loss, m = L.dpo_loss(*_args(), beta=BETA, loss_type=list(types), loss_weights=mix, **_lengths())
    parts = [float(L.dpo_loss(*_args(), beta=BETA, loss_type=t, **_lengths())[0]) for t in types]
    np.testing.assert_allclose(loss, sum(w * p for w, p in zip(mix, parts, strict=True)), rtol=1e-5)
    for t, p in zip(types, parts, strict=True):
        np.testing.assert_allclose(m[f"loss/{t}"], p, rtol=1e-5)
    # Default mixing weights are 1; rewards follow the first type (sigmoid: unnormalised).
    loss, m = L.dpo_loss(*_args(), beta=BETA, loss_type=("sigmoid", "sft"), **_lengths())
    np.testing.assert_allclose(loss, parts[0] + parts[1], rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], np.mean(BETA * CR), rtol=1e-6)


def test_weights_mask_empty_slots_and_reductions():
    # [B=2, P=3] slots; the last slot of row 1 is empty and holds garbage.
    pc_BxP = jnp.asarray([[-1.0, -4.0, -2.5], [-1.0, -2.0, 123.0]])
    pr_BxP = jnp.asarray([[-2.0, -3.0, -6.0], [-9.0, -2.0, -1e4]])
    rc_BxP = jnp.asarray([[-1.5, -3.5, -2.0], [-2.0, -2.0, 0.0]])
    rr_BxP = jnp.asarray([[-1.8, -3.2, -5.0], [-4.0, -2.0, 7.0]])
    w_BxP = jnp.asarray([[1.0, 1.0, 0.5], [2.0, 1.0, 0.0]])
    z = np.asarray((pc_BxP - pr_BxP) - (rc_BxP - rr_BxP), np.float64)
    per = -logsig(BETA * np.asarray(z))
    wn = np.asarray(w_BxP)
    for loss_type in ("sigmoid", "aot", "aot_unpaired"):

        def f(pc, loss_type=loss_type):
            return L.dpo_loss(pc, pr_BxP, rc_BxP, rr_BxP, beta=BETA, weights=w_BxP, loss_type=loss_type)[0]

        assert np.isfinite(float(f(pc_BxP)))
        g = jax.grad(f)(pc_BxP)
        assert float(g[1, 2]) == 0.0 and np.all(np.isfinite(g)), loss_type
    loss, m = L.dpo_loss(pc_BxP, pr_BxP, rc_BxP, rr_BxP, beta=BETA, weights=w_BxP)
    np.testing.assert_allclose(loss, np.sum(wn * per) / wn.sum(), rtol=1e-5)
    total, _ = L.dpo_loss(pc_BxP, pr_BxP, rc_BxP, rr_BxP, beta=BETA, weights=w_BxP, reduction="sum")
    np.testing.assert_allclose(total, np.sum(wn * per), rtol=1e-5)
    none, mn = L.dpo_loss(pc_BxP, pr_BxP, rc_BxP, rr_BxP, beta=BETA, weights=w_BxP, reduction="none")
    assert none.shape == (2, 3) and float(none[1, 2]) == 0.0 and float(mn["rewards/chosen"][1, 2]) == 0.0
    valid = wn > 0
    # Metrics: plain means over the valid pairs.
    np.testing.assert_allclose(m["logps/chosen"], np.asarray(pc_BxP)[valid].mean(), rtol=1e-6)
    # All slots empty: loss 0, metrics 0, nothing NaN.
    loss, m = L.dpo_loss(pc_BxP, pr_BxP, rc_BxP, rr_BxP, weights=jnp.zeros((2, 3)))
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())


def test_bf16_inputs_are_computed_in_float32():
    args16 = _args(jnp.bfloat16)
    args32 = tuple(x.astype(jnp.float32) for x in args16)
    for loss_type in ("sigmoid", "ipo", "orpo"):
        a, ma = L.dpo_loss(*args16, beta=BETA, loss_type=loss_type, **_lengths())
        b, _ = L.dpo_loss(*args32, beta=BETA, loss_type=loss_type, **_lengths())
        assert a.dtype == jnp.float32 and ma["rewards/chosen"].dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)
    g = jax.grad(lambda pc: L.dpo_loss(pc, *args16[1:], beta=BETA)[0])(args16[0])
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


# ------------------------------------------------------------------------------------------------------------
# dpo_loss: gradients, transformations, stability
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_check_grads(loss_type):
    kw, _ = EXPECTED[loss_type]
    lens = _lengths()

    # Eager on purpose: op-by-op kernels are cached across loss types, a jit per type would compile 22 times.
    def f(pc, pr, rc, rr):
        return L.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, **lens, **kw)[0]

    check_grads(f, _args(), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


def test_sigmoid_gradient_closed_form():
    g = jax.grad(lambda pc: L.dpo_loss(pc, *_args()[1:], beta=BETA)[0])(_args()[0])
    np.testing.assert_allclose(g, -BETA * sig(-BETA * Z) / len(Z), rtol=1e-5)


def test_jit_vmap_grad():
    loss_fn = functools.partial(L.dpo_loss, beta=BETA, loss_type="sigmoid")
    eager, m_eager = loss_fn(*_args())
    jitted, m_jit = jax.jit(loss_fn)(*_args())
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(m_jit["rewards/margins"], m_eager["rewards/margins"], rtol=1e-6)
    # vmap over a leading axis: each row gets its own mean.
    rows = tuple(jnp.stack([x, x[::-1]]) for x in _args())
    per_row, _ = jax.vmap(loss_fn)(*rows)
    expected = [float(loss_fn(*(r[i] for r in rows))[0]) for i in range(2)]
    np.testing.assert_allclose(per_row, expected, rtol=1e-6)
    # Traced hyper-parameters (e.g. a schedule) work too.
    traced = jax.jit(
        lambda beta, eps: L.dpo_loss(*_args(), beta=beta, label_smoothing=eps, loss_type="exo_pair")[0]
    )
    np.testing.assert_allclose(traced(BETA, 0.0), EXPECTED["exo_pair"][1].mean(), rtol=1e-5)
    # grad with the metrics as aux, under jit.
    grads, metrics = jax.jit(jax.grad(loss_fn, argnums=(0, 1), has_aux=True))(*_args())
    assert all(np.all(np.isfinite(g)) for g in grads) and set(metrics) >= {"rewards/accuracies"}


def _extreme_inputs():
    # Every combination of very negative, zero, tiny, moderate and (not a log-prob, but finite) large positive
    # values, so margins reach +-2e4; zero and huge lengths.
    vals = np.array([-1e4, 0.0, -1.0, -1e-7, 1e4], np.float32)
    grid = np.stack(np.meshgrid(vals, vals, vals, vals, indexing="ij"), -1).reshape(-1, 4)
    n = len(grid)
    lc = np.resize(np.array([0.0, 1.0, 1e4], np.float32), n)
    lr = np.resize(np.array([1e4, 0.0, 1.0, 3.0], np.float32), n)
    return tuple(jnp.asarray(grid[:, i]) for i in range(4)), jnp.asarray(lc), jnp.asarray(lr)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_extreme_inputs_finite(loss_type):
    kw, _ = EXPECTED[loss_type]
    args, lc, lr = _extreme_inputs()

    def f(*a):
        per_pair, metrics = L.dpo_loss(
            *a, beta=BETA, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, reduction="none", **kw
        )
        return jnp.sum(per_pair), (per_pair, metrics)

    # Eager (kernels shared across loss types); the sum's gradient is each pair's own gradient.
    for dtype in (jnp.float32, jnp.bfloat16):
        (_, (per_pair, metrics)), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(
            *(x.astype(dtype) for x in args)
        )
        assert np.all(np.isfinite(per_pair)), (loss_type, dtype)
        assert all(np.all(np.isfinite(v)) for v in metrics.values()), (loss_type, dtype)
        assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads), (loss_type, dtype)


def test_log1mexp_matches_float64():
    x = np.array([-1e4, -50.0, -5.0, -0.7, -0.69, -1e-2, -1e-5], np.float64)
    np.testing.assert_allclose(
        L._log1mexp(jnp.asarray(x, jnp.float32)),
        np.where(x > -0.69, np.log(-np.expm1(x)), np.log1p(-np.exp(x))),
        rtol=1e-5,
    )
    g = jax.grad(lambda v: jnp.sum(L._log1mexp(v)))(jnp.asarray([0.0, -1e-9, 5.0, -1e4]))
    assert np.all(np.isfinite(g))


def test_validation_errors():
    args = _args()
    with pytest.raises(ValueError, match="valid options: .*sigmoid.*simpo"):
        L.dpo_loss(*args, loss_type="sigmoidd")
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        L.dpo_loss(args[0], args[1], loss_type="sigmoid")
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        L.dpo_loss(args[0], args[1], loss_type=["simpo", "ipo"])
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        L.dpo_loss(*args, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="reduction"):
        L.dpo_loss(*args, reduction="avg")
    with pytest.raises(ValueError, match="loss_weights has 1"):
        L.dpo_loss(*args, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="f_alpha"):
        L.dpo_loss(*args, loss_type="alpha_divergence", f_alpha=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        L.token_logprobs_from_hidden(
            jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), jnp.int32), chunk_size=0
        )


# ------------------------------------------------------------------------------------------------------------
# Log-probabilities
# ------------------------------------------------------------------------------------------------------------

B, T, D, V = 2, 7, 5, 11


def _lm_inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden_BxTxD = rng.normal(size=(B, T, D)).astype(np.float32)
    unembed_DxV = rng.normal(size=(D, V)).astype(np.float32)
    targets_BxT = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask_BxT = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], np.float32)
    return hidden_BxTxD, unembed_DxV, targets_BxT, mask_BxT


def _np_log_softmax(logits):
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_token_and_sequence_logprobs_match_numpy():
    h, w, t, mask = _lm_inputs()
    logits = (h.astype(np.float64) @ w).astype(np.float32)
    expected_BxT = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), t[..., None], -1)[..., 0]
    np.testing.assert_allclose(L.token_logprobs(jnp.asarray(logits), t), expected_BxT, rtol=1e-5, atol=1e-5)
    logps_B, counts_B = L.sequence_logprobs(jnp.asarray(logits), t, mask)
    np.testing.assert_allclose(logps_B, (expected_BxT * mask).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(counts_B, [3.0, 6.0])
    avg_B, _ = L.sequence_logprobs(jnp.asarray(logits), t, mask, average=True)
    np.testing.assert_allclose(avg_B, (expected_BxT * mask).sum(-1) / [3.0, 6.0], rtol=1e-5)
    # bf16 logits come back as float32.
    assert L.token_logprobs(jnp.asarray(logits, jnp.bfloat16), t).dtype == jnp.float32


def test_masked_tokens_contribute_nothing():
    h, w, t, mask = _lm_inputs()
    logits = jnp.asarray(h @ w)
    base, _ = L.sequence_logprobs(logits, t, mask)
    # Garbage at masked positions: huge logits and out-of-vocabulary / ignore-index targets.
    garbage_logits = jnp.where(mask[..., None] > 0, logits, 1e30)
    garbage_t = np.where(mask > 0, t, -100)
    garbage_t[0, -1] = V + 5
    again, _ = L.sequence_logprobs(garbage_logits, garbage_t, mask)
    np.testing.assert_allclose(again, base, rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(L.sequence_logprobs(x, garbage_t, mask, average=True)[0]))(garbage_logits)
    assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0.0)
    # No completion tokens: mean is 0, counts 0, gradient finite.
    empty = jnp.zeros_like(mask)
    avg, counts = L.sequence_logprobs(logits, t, empty, average=True)
    assert np.all(np.asarray(avg) == 0.0) and np.all(np.asarray(counts) == 0.0)
    g = jax.grad(lambda x: jnp.sum(L.sequence_logprobs(x, t, empty, average=True)[0]))(logits)
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize(("chunk_size", "cap"), [(3, None), (5, 2.0), (64, 1.5)])
def test_chunked_hidden_path_equals_plain(chunk_size, cap):
    h, w, t, mask = _lm_inputs(seed=chunk_size)
    assert (B * T) % chunk_size != 0

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return L.sequence_logprobs(logits, t, mask, average=True)[0]

    coef = jnp.asarray([1.0, -0.5])  # a weighted sum, so each row's gradient is scaled differently

    @jax.jit  # one compile for values, token log-probs and gradients
    def chunked(h, w):
        def objective(h, w):
            seq_B, _ = L.sequence_logprobs_from_hidden(
                h, w, t, mask, average=True, chunk_size=chunk_size, logit_soft_cap=cap
            )
            return jnp.sum(coef * seq_B), seq_B

        (_, seq_B), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, w)
        tokens = L.token_logprobs_from_hidden(h, w, t, chunk_size=chunk_size, logit_soft_cap=cap)
        return seq_B, tokens, grads

    seq_B, tokens_BxT, g_chunk = chunked(h, w)
    np.testing.assert_allclose(seq_B, plain(h, w), rtol=1e-5, atol=1e-5)
    logits = jnp.asarray(h @ w)
    capped = cap * jnp.tanh(logits / cap) if cap is not None else logits
    np.testing.assert_allclose(tokens_BxT, L.token_logprobs(capped, t), rtol=1e-5, atol=1e-5)
    g_plain = jax.grad(lambda h, w: jnp.sum(coef * plain(h, w)), argnums=(0, 1))(h, w)
    for a, b in zip(g_chunk, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_bf16_inputs():
    h, w, t, mask = _lm_inputs()
    h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out, _ = L.sequence_logprobs_from_hidden(h16, w16, t, mask, chunk_size=4)
    ref, _ = L.sequence_logprobs(
        jnp.einsum("btd,dv->btv", h16.astype(jnp.float32), w16.astype(jnp.float32)), t, mask
    )
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda x: jnp.sum(L.sequence_logprobs_from_hidden(x, w16, t, mask, chunk_size=4)[0]))(h16)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize(("chunk_size", "cap"), [(2, None), (3, 1.5), (64, None)])
def test_masked_hidden_path_equals_plain(chunk_size, cap):
    # mask_BxT scores the masked positions only (the others are 0): same values and gradients as plain.
    h, w, t, mask = _lm_inputs(seed=10 + chunk_size)
    coef = jnp.asarray(np.random.default_rng(2).normal(size=(B, T)).astype(np.float32))

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return jnp.where(mask > 0, L.token_logprobs(logits, t), 0.0)

    def masked(h, w):
        return L.token_logprobs_from_hidden(h, w, t, mask_BxT=mask, chunk_size=chunk_size, logit_soft_cap=cap)

    np.testing.assert_allclose(masked(h, w), plain(h, w), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(masked(h, w))[mask == 0] == 0.0)
    g_masked = jax.grad(lambda h, w: jnp.sum(coef * masked(h, w)), argnums=(0, 1))(h, w)
    g_plain = jax.grad(lambda h, w: jnp.sum(coef * plain(h, w)), argnums=(0, 1))(h, w)
    for a, b in zip(g_masked, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_masked_hidden_path_never_projects_unscored_positions():
    # Each row scores exactly 4 positions (scattered); with chunks of 4 they fill chunk 0 after the sort, so
    # 1 of 4 chunks runs. NaN hidden states everywhere else would poison the value or the unembedding's
    # gradient (NaN * 0) if any unscored position were projected.
    rng = np.random.default_rng(3)
    b, t_len, d, v, chunk = 3, 16, 4, 9, 4
    mask = np.zeros((b, t_len), np.float32)
    for r in range(b):
        mask[r, rng.choice(t_len, size=chunk, replace=False)] = 1.0
    h = rng.normal(size=(b, t_len, d)).astype(np.float32)
    h_nan = np.where(mask[..., None] > 0, h, np.nan).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    t = rng.integers(0, v, size=(b, t_len)).astype(np.int32)

    def f(h, w, groups=b):
        return L._chunked(h, w, t, chunk, None, wpo=False, mask_BxT=mask, row_groups=groups)

    logp, n_run = jax.jit(f)(h_nan, w)
    assert int(n_run) == 1
    np.testing.assert_allclose(logp, f(h, w)[0], rtol=1e-6, atol=1e-6)
    assert int(f(h, w)[1]) == 1 and int(L._chunked(h, w, t, chunk, None, wpo=False)[1]) == b * t_len // chunk
    # All rows in one group (the default): their 12 scored positions fill 3 of the 12 chunks of 4.
    logp_merged, n_merged = jax.jit(lambda h, w: f(h, w, 1))(h_nan, w)
    assert int(n_merged) == 3
    np.testing.assert_allclose(logp_merged, logp, rtol=1e-6, atol=1e-6)
    g_h, g_w = jax.jit(jax.grad(lambda h, w: jnp.sum(f(h, w)[0]), argnums=(0, 1)))(h_nan, w)
    assert np.all(np.isfinite(g_w)) and np.all(np.isfinite(np.asarray(g_h)[mask > 0]))
    assert np.all(np.asarray(g_h)[mask == 0] == 0.0)


def test_chunked_backward_never_builds_full_logits():
    # A vocabulary large enough that a float32 [B, T, V] tensor dominates everything else.
    b, t_len, d, v, chunk = 2, 64, 8, 4096, 8
    h = jnp.zeros((b, t_len, d), jnp.float32)
    w = jnp.zeros((d, v), jnp.float32)
    tg = jnp.zeros((b, t_len), jnp.int32)
    mask = jnp.ones((b, t_len), jnp.float32)

    def f(h, w):
        return jnp.sum(L.sequence_logprobs_from_hidden(h, w, tg, mask, chunk_size=chunk)[0])

    # No intermediate of the backward pass has B*T*V elements (checked on the traced program).
    full = b * t_len * v
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h, w)

    def sizes(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        sub = sub.jaxpr
                    if isinstance(sub, jex_core.Jaxpr):  # scan / checkpoint bodies
                        yield from sizes(sub)

    all_sizes = list(sizes(jaxpr.jaxpr))
    assert max(all_sizes) < full // 4
    assert chunk * v in all_sizes  # the walk did reach the per-chunk logits inside the scan (rows in 1 group)
    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile()
    mem = compiled.memory_analysis()
    if mem is not None and getattr(mem, "temp_size_in_bytes", 0):
        assert mem.temp_size_in_bytes < full * 4 // 2


def test_segment_logprobs_packed_rows():
    # Row 0: one pair (segments 1, 2) then padding; row 1: two pairs (segments 1..4), segment 3 unscored.
    logp_BxT = jnp.asarray([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]])
    mask_BxT = jnp.asarray([[0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 1, 1]], jnp.float32)
    seg_BxT = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 2, 3, 4, 4]], jnp.int32)
    logps_BxS, counts_BxS = L.segment_logprobs(logp_BxT, mask_BxT, seg_BxT, 4)
    np.testing.assert_allclose(logps_BxS, [[-5.0, -5.0, 0.0, 0.0], [-3.0, -3.0, 0.0, -11.0]])
    np.testing.assert_allclose(counts_BxS, [[2, 1, 0, 0], [2, 1, 0, 2]])
    avg_BxS, _ = L.segment_logprobs(logp_BxT, mask_BxT, seg_BxT, 4, average=True)
    np.testing.assert_allclose(avg_BxS, [[-2.5, -5.0, 0.0, 0.0], [-1.5, -3.0, 0.0, -5.5]])
    # chosen = even columns, rejected = odd columns, as the data path lays them out.
    loss, _ = L.dpo_loss(
        logps_BxS[:, 0::2], logps_BxS[:, 1::2], logps_BxS[:, 0::2], logps_BxS[:, 1::2],
        weights=jnp.asarray([[1.0, 0.0], [1.0, 1.0]]),
    )  # fmt: skip
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)


def test_wpo_weights():
    h, w, t, mask = _lm_inputs()
    logits = (h.astype(np.float64) @ w).astype(np.float64)
    logp_V = _np_log_softmax(logits)
    adj = np.take_along_axis(logp_V, t[..., None], -1)[..., 0] - np.log(np.exp(2 * logp_V).sum(-1))
    got = L.wpo_token_logprobs(jnp.asarray(logits, jnp.float32), t)
    np.testing.assert_allclose(got, adj, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        L.wpo_token_logprobs_from_hidden(h, w, t, chunk_size=3), got, rtol=1e-5, atol=1e-5
    )
    sums, counts = L.segment_logprobs(got, mask, jnp.ones_like(t), 1)
    # Row 0 as chosen, row 1 as rejected, for one pair.
    weights = L.wpo_weights(sums[0], sums[1], counts[0], counts[1])
    expected = min(1.0, math.exp((adj[0] * mask[0]).sum() / 3 + (adj[1] * mask[1]).sum() / 6))
    np.testing.assert_allclose(weights, [expected], rtol=1e-4)
    # Zero lengths and large positive sums are finite and capped at 1.
    capped = L.wpo_weights(jnp.asarray([50.0, 0.0]), jnp.asarray([50.0, -1e4]), jnp.asarray([1.0, 0.0]), 1.0)
    np.testing.assert_allclose(capped, [1.0, 0.0], atol=1e-30)


def test_log_probs_shard_with_batch_rows():
    # Row-local by construction: with the rows split over the 8 simulated devices, results match the
    # unsharded ones and stay split by rows (no gather of the batch onto one device).
    n = len(jax.devices())
    rng = np.random.default_rng(1)
    h_BxTxD = rng.normal(size=(n, 6, 4)).astype(np.float32)
    w_DxV = rng.normal(size=(4, 9)).astype(np.float32)
    t_BxT = rng.integers(0, 9, size=(n, 6)).astype(np.int32)
    seg_BxT = np.tile(np.array([1, 1, 1, 2, 2, 0], np.int32), (n, 1))
    mask_BxT = (seg_BxT > 0).astype(np.float32)
    mesh = jax.make_mesh((n,), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.jit
    def f(h, t, seg, mask):
        # One row group per batch shard (what the trainer passes): the sort stays on each device.
        logp_BxT = L.token_logprobs_from_hidden(h, w_DxV, t, mask_BxT=mask, chunk_size=4, row_groups=n)
        return L.segment_logprobs(logp_BxT, mask, seg, 2)[0]

    sharded = f(*(jax.device_put(x, rows) for x in (h_BxTxD, t_BxT, seg_BxT, mask_BxT)))
    np.testing.assert_allclose(sharded, f(h_BxTxD, t_BxT, seg_BxT, mask_BxT), rtol=1e-5, atol=1e-5)
    assert sharded.sharding.spec[0] == "data"
