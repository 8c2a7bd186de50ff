"""Tests for jdpo.losses.pairwise: closed forms for every loss type, stability, gradients, validation.

Expected values are computed here with numpy / math from the papers' formulas, independently of the
implementation. Shapes are tiny so that compilation (not compute) dominates; keep it that way.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import modules_imported_by
from jax.test_util import check_grads

from jdpo.losses import (
    pairwise as L,  # ------------------------------------------------------------------------------------------------------------
)

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
        L.log1mexp(jnp.asarray(x, jnp.float32)),
        np.where(x > -0.69, np.log(-np.expm1(x)), np.log1p(-np.exp(x))),
        rtol=1e-5,
    )
    g = jax.grad(lambda v: jnp.sum(L.log1mexp(v)))(jnp.asarray([0.0, -1e-9, 5.0, -1e4]))
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


def test_loss_library_import_is_light():
    """`import jdpo; jdpo.dpo_loss` and the log-prob functions load jax only: no flax, transformers, torch."""
    out = modules_imported_by(
        "import jdpo; jdpo.dpo_loss, jdpo.sequence_logprobs, jdpo.sequence_logprobs_from_hidden",
        ("flax", "transformers", "torch", "optax", "orbax"),
    )
    assert out.strip() == "[]"
