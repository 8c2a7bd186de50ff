"""Tests for jdpo.losses.unpaired: KTO / APO-zero unpaired / BCO closed forms, KTO's KL estimate and its
mismatched pairing, BCO's running moments against a numpy transcription of TRL's, metrics, stability,
transformations and validation.

Expected values are written here in numpy (float64) from the papers' / TRL's formulas, independently of the
implementation (e.g. 1 - sigmoid(x) literally, where the library computes sigmoid(-x)). Shapes stay tiny.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jdpo.losses import unpaired as U
from jdpo.losses.defaults import DEFAULTS

BETA = 0.5
WD, WU = 1.3, 0.7  # desirable / undesirable weights away from 1, so a swap or omission shows
KL = 0.4
DELTA = -0.3
# Six examples, desirable and not; no two log-ratios equal.
POL = np.array([-1.0, -4.0, -2.5, -1.0, -7.0, -3.0])
REF = np.array([-1.5, -3.5, -2.2, -2.0, -6.0, -3.9])
LAB = np.array([True, False, True, False, False, True])
R = POL - REF


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def logsig(x):
    return -np.logaddexp(0.0, -x)


def weighted(desirable_losses, undesirable_losses, wd=WD, wu=WU):
    return np.where(LAB, wd * desirable_losses, wu * undesirable_losses)


# loss_type -> (extra kwargs, expected per-example losses); TRL's formulas, transcribed.
EXPECTED = {
    "kto": ({"kl": KL}, weighted(1 - sig(BETA * (R - KL)), 1 - sig(BETA * (KL - R)))),
    "apo_zero_unpaired": ({}, weighted(1 - sig(BETA * R), sig(BETA * R))),
    "bco": ({"delta": DELTA}, weighted(-logsig(BETA * R - DELTA), -logsig(-(BETA * R - DELTA)))),
}


def _args(dtype=jnp.float32):
    return jnp.asarray(POL, dtype), jnp.asarray(REF, dtype), jnp.asarray(LAB)


def _loss(loss_type, *args, **kw):
    extra, _ = EXPECTED[loss_type]
    kw = {"beta": BETA, "desirable_weight": WD, "undesirable_weight": WU, **extra, **kw}
    return U.kto_loss(*(args or _args()), loss_type=loss_type, **kw)


# ------------------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------------------


def test_every_loss_type_has_a_closed_form_test():
    assert set(EXPECTED) == set(U.UNPAIRED_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_closed_form(loss_type):
    _, expected = EXPECTED[loss_type]
    per_example, _ = _loss(loss_type, reduction="none")
    np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-6)
    mean, _ = _loss(loss_type)
    np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5)  # over ALL examples, not per class
    total, _ = _loss(loss_type, reduction="sum")
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-5)


@pytest.mark.parametrize(
    "labels", [LAB, LAB.astype(np.int32), LAB.astype(np.float32), jnp.asarray(LAB, jnp.int8)]
)
def test_labels_bool_or_zero_one(labels):
    per_example, _ = _loss("kto", jnp.asarray(POL), jnp.asarray(REF), labels, reduction="none")
    np.testing.assert_allclose(per_example, EXPECTED["kto"][1], rtol=1e-5)


@pytest.mark.parametrize("shape", [(6,), (2, 3)])
def test_step_one_kto_is_half(shape):
    """Policy == reference (step 1): kl = kto_kl(...) = 0 and every example costs 1 - s(0) = 0.5."""
    x = jnp.asarray([-3.0, -7.5, -0.2, -40.0, -1.0, -2.0]).reshape(shape)
    x_kl = jnp.asarray([-5.0, -2.0, -9.0, -1.5, -3.3, -8.0]).reshape(shape)
    kl = U.kto_kl(x_kl, x_kl)
    assert float(kl) == 0.0
    for labels in (np.ones(shape, bool), np.zeros(shape, bool), LAB.reshape(shape)):
        loss, m = U.kto_loss(x, x, labels, kl=kl)
        assert float(loss) == 0.5, labels
        assert float(m["rewards/chosen"]) == float(m["rewards/rejected"]) == 0.0
        assert float(m["kl"]) == 0.0
        loss, _ = U.kto_loss(x, x, labels, loss_type="apo_zero_unpaired")
        assert float(loss) == 0.5
        # BCO at step 1: the running mean of all-zero rewards is 0, each example costs ln 2.
        moments = U.running_moments_update(U.running_moments_init(), DEFAULTS["beta"] * (x - x))
        loss, _ = U.kto_loss(x, x, labels, loss_type="bco", delta=moments["mean"])
        np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)


def test_class_weights_scale_their_class_only():
    """w_d multiplies every desirable example's loss, w_u every undesirable one's; the mean stays over all
    examples (TRL concatenates the weighted losses, then averages)."""
    for loss_type in sorted(EXPECTED):
        extra, _ = EXPECTED[loss_type]

        def mean(wd, wu, loss_type=loss_type, extra=extra):
            args = _args()
            kw = {"beta": BETA, "desirable_weight": wd, "undesirable_weight": wu, **extra}
            return float(U.kto_loss(*args, loss_type=loss_type, **kw)[0])

        unit, _ = U.kto_loss(*_args(), loss_type=loss_type, beta=BETA, reduction="none", **extra)
        unit = np.asarray(unit, np.float64)
        d_sum, u_sum, n = unit[LAB].sum(), unit[~LAB].sum(), len(LAB)
        np.testing.assert_allclose(mean(1.0, 1.0), (d_sum + u_sum) / n, rtol=1e-6)
        np.testing.assert_allclose(mean(2.0, 1.0) - mean(1.0, 1.0), d_sum / n, rtol=1e-5)
        np.testing.assert_allclose(mean(1.0, 3.0) - mean(1.0, 1.0), 2 * u_sum / n, rtol=1e-5)
        np.testing.assert_allclose(mean(0.0, 1.0), u_sum / n, rtol=1e-6)  # desirable examples drop out
        np.testing.assert_allclose(mean(WD, WU), (WD * d_sum + WU * u_sum) / n, rtol=1e-6)


def test_kto_reference_point_shifts_the_classes_oppositely():
    # Raising kl makes every desirable example costlier and every undesirable one cheaper.
    lo, _ = U.kto_loss(*_args(), kl=0.0, beta=BETA, reduction="none")
    hi, _ = U.kto_loss(*_args(), kl=2.0, beta=BETA, reduction="none")
    assert np.all(np.asarray(hi)[LAB] > np.asarray(lo)[LAB])
    assert np.all(np.asarray(hi)[~LAB] < np.asarray(lo)[~LAB])
    # kl may be broadcastable, e.g. one value per row of [B, P].
    per_row_kl = jnp.asarray([[0.0], [2.0]])
    both, _ = U.kto_loss(*(x.reshape(2, 3) for x in _args()), kl=per_row_kl, beta=BETA, reduction="none")
    np.testing.assert_allclose(both[0], np.asarray(lo).reshape(2, 3)[0], rtol=1e-6)
    np.testing.assert_allclose(both[1], np.asarray(hi).reshape(2, 3)[1], rtol=1e-6)


def test_small_losses_keep_their_precision():
    # 1 - s(x) is computed as s(-x): a well-fitted example's loss is tiny, not rounded to 0.
    pol, ref = jnp.asarray([100.0, -100.0]), jnp.zeros(2)
    lab = jnp.asarray([True, False])
    for loss_type, kw in (("kto", {"kl": 0.0}), ("apo_zero_unpaired", {})):
        per_example, _ = U.kto_loss(pol, ref, lab, loss_type=loss_type, beta=0.5, reduction="none", **kw)
        np.testing.assert_allclose(per_example, [sig(-50.0), sig(-50.0)], rtol=1e-5)
        assert float(per_example[0]) > 0.0


def test_bco_scales_the_log_ratio_before_the_shift():
    # TRL's BCOTrainer: rewards = beta * logratio; loss -log s(rewards - delta). Not beta * (r - delta).
    per_example, _ = _loss("bco", reduction="none", desirable_weight=1.0, undesirable_weight=1.0)
    wrong = np.where(LAB, -logsig(BETA * (R - DELTA)), -logsig(-BETA * (R - DELTA)))
    assert not np.allclose(per_example, wrong, rtol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# KL estimate and its mismatched pairs
# ------------------------------------------------------------------------------------------------------------


def test_kto_kl_closed_form_clamp_and_mask():
    p = jnp.asarray([-2.0, -3.0, -1.0, -6.0])
    r = jnp.asarray([-2.5, -2.0, -1.4, -6.2])
    np.testing.assert_allclose(U.kto_kl(p, r), np.mean(np.asarray(p) - np.asarray(r)), rtol=1e-6)
    assert float(U.kto_kl(r, p)) == 0.0  # a negative mean log-ratio is clamped to 0
    # Empty slots (weight 0) may hold anything, inf included.
    p_bad = jnp.asarray([-2.0, -3.0, jnp.inf, -6.0])
    w = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    assert float(U.kto_kl(p_bad, r, w)) == 0.0  # mean(0.5, -1.0, 0.2) < 0
    np.testing.assert_allclose(U.kto_kl(p + 1.0, r, w), np.mean([1.5, 0.0, 1.2]), rtol=1e-6)
    assert float(U.kto_kl(p, r, jnp.zeros(4))) == 0.0  # no valid example
    # Any shape at once (e.g. a step's [A, B, P] micro-batches): one mean over all valid examples.
    np.testing.assert_allclose(U.kto_kl(p.reshape(2, 1, 2), r.reshape(2, 1, 2)), U.kto_kl(p, r), rtol=1e-6)
    # No gradient flows through the estimate.
    g = jax.grad(lambda x: U.kto_kl(x, r))(p)
    assert np.all(np.asarray(g) == 0.0)
    g = jax.grad(lambda k: U.kto_loss(*_args(), kl=k, beta=BETA)[0])(0.3)
    assert float(g) == 0.0


# ------------------------------------------------------------------------------------------------------------
# BCO's running moments
# ------------------------------------------------------------------------------------------------------------


class TRLRunningMoments:
    """numpy transcription of TRL's RunningMoments (trl/trainer/utils.py), single process, float64."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs):
        xs = np.asarray(xs, np.float64)
        xs_count = xs.size
        xs_mean, xs_var = xs.mean(), xs.var()  # torch.var_mean(unbiased=False)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += delta * xs_count / tot_count
        new_var = tot_sum / tot_count
        self.std = math.sqrt(new_var * tot_count / (tot_count - 1))
        self.var = new_var
        self.count = tot_count


def _reward_batches():
    rng = np.random.default_rng(0)
    return [
        rng.normal(loc, scale, size) for loc, scale, size in [(0.3, 1.0, 8), (-1.0, 0.5, 3), (2.0, 2.0, 5)]
    ]


def test_running_moments_match_trl():
    trl, moments = TRLRunningMoments(), U.running_moments_init()
    assert float(moments["mean"]) == trl.mean and float(moments["var"]) == trl.var
    update = jax.jit(U.running_moments_update)
    for batch in _reward_batches() + [np.full(4, 0.25)]:
        trl.update(batch)
        moments = update(moments, jnp.asarray(batch, jnp.float32))
        np.testing.assert_allclose(moments["mean"], trl.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moments["var"], trl.var, rtol=1e-5, atol=1e-6)
        assert int(moments["count"]) == round(trl.count)
    # And the stream's plain statistics (the merge is exact).
    stream = np.concatenate(_reward_batches() + [np.full(4, 0.25)])
    np.testing.assert_allclose(moments["mean"], stream.mean(), rtol=1e-5)
    np.testing.assert_allclose(moments["var"], stream.var(), rtol=1e-5)
    # TRL's std is derived: sqrt(var * count / (count - 1)).
    c = float(moments["count"])
    np.testing.assert_allclose(np.sqrt(float(moments["var"]) * c / (c - 1)), trl.std, rtol=1e-5)


def test_running_moments_mask_split_and_empty():
    a, b = _reward_batches()[:2]
    # Masked slots are not values: padding with garbage (inf) and weight 0 changes nothing.
    padded = jnp.asarray(np.concatenate([a, [np.inf, 123.0]]), jnp.float32)
    w = jnp.asarray([1.0] * len(a) + [0.0, 0.0])
    m_pad = U.running_moments_update(U.running_moments_init(), padded, w)
    m_ref = U.running_moments_update(U.running_moments_init(), jnp.asarray(a, jnp.float32))
    for k in ("mean", "var", "count"):
        np.testing.assert_allclose(m_pad[k], m_ref[k], rtol=1e-6)
    # Two batches in sequence == their concatenation in one (e.g. per micro-batch vs per step).
    seq = U.running_moments_update(m_ref, jnp.asarray(b, jnp.float32))
    one = U.running_moments_update(U.running_moments_init(), jnp.asarray(np.concatenate([a, b]), jnp.float32))
    for k in ("mean", "var", "count"):
        np.testing.assert_allclose(seq[k], one[k], rtol=1e-5)
    # A batch without valid values is a no-op (TRL would divide by zero), also on the fresh state.
    for state in (seq, U.running_moments_init()):
        same = U.running_moments_update(state, padded, jnp.zeros(len(padded)))
        for k in ("mean", "var", "count"):
            assert float(same[k]) == float(state[k]), k
    # No gradient through the state update.
    g = jax.grad(lambda x: U.running_moments_update(U.running_moments_init(), x)["mean"])(jnp.asarray(a))
    assert np.all(np.asarray(g) == 0.0)


def test_bco_with_running_delta_like_trl():
    """One TRL BCO step: update the moments with the batch's rewards, then shift by their new mean."""
    moments = U.running_moments_update(
        U.running_moments_init(), jnp.asarray(_reward_batches()[0], jnp.float32)
    )
    pol, ref, lab = _args()
    moments = U.running_moments_update(moments, BETA * (pol - ref))
    trl = TRLRunningMoments()
    trl.update(_reward_batches()[0])
    trl.update(BETA * R)
    loss, m = U.kto_loss(pol, ref, lab, loss_type="bco", beta=BETA, delta=moments["mean"])
    expected = np.where(LAB, -logsig(BETA * R - trl.mean), -logsig(-(BETA * R - trl.mean)))
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["delta"], trl.mean, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------


def test_metrics_values():
    _, m = _loss("kto")
    np.testing.assert_allclose(m["rewards/chosen"], np.mean(BETA * R[LAB]), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], np.mean(BETA * R[~LAB]), rtol=1e-6)
    np.testing.assert_allclose(
        m["rewards/margins"], np.mean(BETA * R[LAB]) - np.mean(BETA * R[~LAB]), rtol=1e-5
    )
    np.testing.assert_allclose(m["logps/chosen"], np.mean(POL[LAB]), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], np.mean(POL[~LAB]), rtol=1e-6)
    assert float(m["count/chosen"]) == LAB.sum() and float(m["count/rejected"]) == (~LAB).sum()
    np.testing.assert_allclose(m["kl"], KL, rtol=1e-6)
    assert "delta" not in m
    _, m = _loss("bco")
    np.testing.assert_allclose(m["delta"], DELTA, rtol=1e-6)
    assert "kl" not in m
    _, m = _loss("apo_zero_unpaired")
    assert "kl" not in m and "delta" not in m


def test_per_example_metrics_sum_to_the_means():
    """reduction="none": per-example metrics whose sums over any split (micro-batches) give the means."""
    for loss_type in sorted(EXPECTED):
        _, mean_metrics = _loss(loss_type)
        _, per = _loss(loss_type, reduction="none")
        assert "rewards/margins" not in per
        np.testing.assert_allclose(per["rewards/chosen"], np.where(LAB, BETA * R, 0.0), rtol=1e-6)
        np.testing.assert_allclose(per["count/rejected"], (~LAB).astype(np.float32))
        # Two micro-batches, summed like the step sums its micro-batches.
        halves = [
            _loss(loss_type, *(x[sl] for x in _args()), reduction="none")[1]
            for sl in (slice(0, 2), slice(2, 6))
        ]
        sums = {k: sum(jnp.sum(h[k]) for h in halves) for k in halves[0]}
        means = U.kto_metric_means({**sums, "loss": jnp.asarray(7.0)})
        assert float(means["loss"]) == 7.0  # other keys pass through
        for k, v in mean_metrics.items():
            np.testing.assert_allclose(means[k], v, rtol=1e-5, atol=1e-7, err_msg=f"{loss_type} {k}")


def test_empty_slots_and_empty_classes():
    # [2, 3] slots; the last slot of row 1 is empty and holds garbage.
    pol = jnp.asarray([[-1.0, -4.0, -2.5], [-1.0, -7.0, jnp.inf]])
    ref = jnp.asarray([[-1.5, -3.5, -2.2], [-2.0, -6.0, -jnp.nan]])
    lab = jnp.asarray([[True, False, True], [False, False, True]])
    w = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    valid = np.asarray(w) > 0
    for loss_type in sorted(EXPECTED):
        extra, _ = EXPECTED[loss_type]
        loss, m = U.kto_loss(pol, ref, lab, weights=w, loss_type=loss_type, beta=BETA, **extra)
        full, _ = U.kto_loss(*_args(), loss_type=loss_type, beta=BETA, reduction="none", **extra)
        np.testing.assert_allclose(loss, np.asarray(full)[:5].mean(), rtol=1e-5)  # the 5 valid examples
        assert float(m["count/chosen"]) == 2.0 and float(m["count/rejected"]) == 3.0
        assert all(np.isfinite(float(v)) for v in m.values())
        none, mn = U.kto_loss(
            pol, ref, lab, weights=w, loss_type=loss_type, beta=BETA, reduction="none", **extra
        )
        assert float(none[1, 2]) == 0.0 and all(float(v[1, 2]) == 0.0 for v in mn.values())
        g = jax.grad(
            lambda p, lt=loss_type, ex=extra: U.kto_loss(p, ref, lab, weights=w, loss_type=lt, **ex)[0]
        )(pol)
        assert float(g[1, 2]) == 0.0 and np.all(np.isfinite(g[valid])), loss_type
    # One class absent: its means are 0 with count 0 (fixed keys under jit; TRL omits them).
    _, m = U.kto_loss(*_args()[:2], np.ones(6, bool), kl=KL)
    assert float(m["count/rejected"]) == 0.0 and float(m["rewards/rejected"]) == 0.0
    # All slots empty: loss 0, metrics 0, nothing NaN.
    loss, m = U.kto_loss(*_args(), kl=KL, weights=jnp.zeros(6))
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())


def test_bf16_inputs_are_computed_in_float32():
    for loss_type in sorted(EXPECTED):
        a, ma = _loss(loss_type, *_args(jnp.bfloat16))
        b, _ = _loss(loss_type, *(x.astype(jnp.float32) for x in _args(jnp.bfloat16)[:2]), jnp.asarray(LAB))
        assert a.dtype == jnp.float32 and ma["rewards/chosen"].dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Gradients, transformations, stability
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_check_grads(loss_type):
    lab = jnp.asarray(LAB)

    def f(pol, ref):
        return _loss(loss_type, pol, ref, lab)[0]

    check_grads(f, _args()[:2], order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


def test_kto_gradient_closed_form():
    # d/dp w_d (1 - s(x)) = -w_d b s(x) (1 - s(x)), x = b (r - kl); undesirable: +w_u b s(y) (1 - s(y)).
    g = jax.grad(lambda p: _loss("kto", p, *_args()[1:])[0])(_args()[0])
    x, y = BETA * (R - KL), BETA * (KL - R)
    expected = np.where(LAB, -WD * BETA * sig(x) * (1 - sig(x)), WU * BETA * sig(y) * (1 - sig(y))) / len(R)
    np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_jit_vmap_grad():
    for loss_type in sorted(EXPECTED):
        extra, _ = EXPECTED[loss_type]
        loss_fn = functools.partial(U.kto_loss, beta=BETA, loss_type=loss_type, **extra)
        eager, m_eager = loss_fn(*_args())
        jitted, m_jit = jax.jit(loss_fn)(*_args())
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
        np.testing.assert_allclose(m_jit["rewards/margins"], m_eager["rewards/margins"], rtol=1e-6)
        # vmap over a leading axis: each row gets its own mean.
        rows = tuple(jnp.stack([x, x[::-1]]) for x in _args())
        per_row, _ = jax.vmap(loss_fn)(*rows)
        expected = [float(loss_fn(*(r[i] for r in rows))[0]) for i in range(2)]
        np.testing.assert_allclose(per_row, expected, rtol=1e-6)
        # grad with the metrics as aux, under jit.
        grads, metrics = jax.jit(jax.grad(loss_fn, argnums=(0, 1), has_aux=True))(*_args())
        assert all(np.all(np.isfinite(g)) for g in grads) and "count/chosen" in metrics
    # Traced hyper-parameters and inputs (a beta schedule; kl / delta / moments computed in the step).
    traced = jax.jit(
        lambda beta, wd, kl: U.kto_loss(
            *_args(), beta=beta, desirable_weight=wd, undesirable_weight=WU, kl=kl
        )[0]
    )
    np.testing.assert_allclose(traced(BETA, WD, KL), EXPECTED["kto"][1].mean(), rtol=1e-5)

    @jax.jit
    def bco_step(moments, pol, ref, lab):
        moments = U.running_moments_update(moments, BETA * (pol - ref))
        return U.kto_loss(pol, ref, lab, loss_type="bco", beta=BETA, delta=moments["mean"])[0], moments

    loss, moments = bco_step(U.running_moments_init(), *_args())
    expected = np.where(LAB, -logsig(BETA * R - BETA * R.mean()), -logsig(-(BETA * R - BETA * R.mean())))
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    assert int(moments["count"]) == 6


def _extreme_inputs():
    # Every combination of very negative, zero, tiny, moderate and (not a log-prob, but finite) large positive
    # log-probs, so log-ratios reach +-2e4, for both labels.
    vals = np.array([-1e4, 0.0, -1.0, -1e-7, 1e4], np.float32)
    grid = np.stack(np.meshgrid(vals, vals, [True, False], indexing="ij"), -1).reshape(-1, 3)
    return jnp.asarray(grid[:, 0]), jnp.asarray(grid[:, 1]), jnp.asarray(grid[:, 2] > 0)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED))
def test_extreme_inputs_finite(loss_type):
    pol, ref, lab = _extreme_inputs()
    extra = {"kto": [{"kl": 0.0}, {"kl": 1e4}], "bco": [{"delta": 0.0}, {"delta": -1e4}, {"delta": 1e4}]}
    for kw in extra.get(loss_type, [{}]):

        def f(p, r, kw=kw):
            per_example, metrics = U.kto_loss(
                p, r, lab, loss_type=loss_type, beta=BETA, reduction="none", **kw
            )
            return jnp.sum(per_example), (per_example, metrics)

        for dtype in (jnp.float32, jnp.bfloat16):
            (_, (per_example, metrics)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
                pol.astype(dtype), ref.astype(dtype)
            )
            assert np.all(np.isfinite(per_example)), (loss_type, kw, dtype)
            assert all(np.all(np.isfinite(v)) for v in metrics.values()), (loss_type, kw, dtype)
            assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads), (loss_type, kw, dtype)
    assert np.isfinite(float(U.kto_kl(pol, ref))) and np.isfinite(float(U.kto_kl(ref, pol)))
    moments = U.running_moments_update(U.running_moments_init(), BETA * (pol - ref))
    assert all(np.isfinite(float(v)) for v in moments.values())


# ------------------------------------------------------------------------------------------------------------
# Validation, defaults, exports
# ------------------------------------------------------------------------------------------------------------


def test_validation_errors_name_the_option():
    pol, ref, lab = _args()
    cases = [
        (
            {"loss_type": "ktoo", "kl": 0.0},
            "loss_type: unknown 'ktoo'; valid options: kto, apo_zero_unpaired, bco",
        ),
        ({"beta": 0.0, "kl": 0.0}, "beta must be > 0"),
        ({"beta": float("nan"), "kl": 0.0}, "beta must be > 0"),
        ({"beta": float("inf"), "kl": 0.0}, "beta must be > 0 and finite"),
        ({"desirable_weight": -1.0, "kl": 0.0}, "desirable_weight must be >= 0"),
        ({"undesirable_weight": float("nan"), "kl": 0.0}, "undesirable_weight must be >= 0"),
        ({"desirable_weight": 0.0, "undesirable_weight": 0.0, "kl": 0.0}, "both 0"),
        ({"reduction": "avg", "kl": 0.0}, "reduction"),
        ({}, "loss_type 'kto' needs kl"),
        ({"kl": float("nan")}, "kl must be finite"),
        ({"loss_type": "bco"}, "loss_type 'bco' needs delta"),
        ({"loss_type": "bco", "delta": 0.0, "kl": 0.0}, "kl is given but loss_type 'bco'"),
        (
            {"loss_type": "apo_zero_unpaired", "delta": 0.0},
            "delta is given but loss_type 'apo_zero_unpaired'",
        ),
        ({"kl": 0.0, "weights": jnp.asarray([1.0, 1.0, -1.0, 1.0, 1.0, 1.0])}, "weights must be >= 0"),
        ({"kl": 0.0, "weights": jnp.ones(4)}, "weights has shape"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            U.kto_loss(pol, ref, lab, **kw)
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but policy_logps has shape \(6,\)"):
        U.kto_loss(pol, ref, lab[:5], kl=0.0)
    with pytest.raises(ValueError, match=r"ref_logps has shape \(2, 3\)"):
        U.kto_loss(pol, ref.reshape(2, 3), lab, kl=0.0)
    with pytest.raises(ValueError, match=r"labels must be boolean or 0 / 1.*\[2\]"):
        U.kto_loss(pol, ref, np.array([1, 0, 2, 1, 0, 1]), kl=0.0)
    with pytest.raises(ValueError, match="labels must be boolean or 0 / 1, got dtype"):
        U.kto_loss(pol, ref, np.array(["y"] * 6), kl=0.0)
    # The config's view: fields named with its prefix, no per-call inputs needed.
    with pytest.raises(ValueError, match="dpo.undesirable_weight must be >= 0"):
        U.check_unpaired_options(loss_type="kto", undesirable_weight=-0.5, prefix="dpo.")
    U.check_unpaired_options(loss_type="bco", prefix="dpo.")  # delta comes from the train state later
    # Under jit the values of traced arrays are not checked (shapes still are).
    jax.jit(lambda w: U.kto_loss(pol, ref, lab, kl=0.0, weights=w)[0])(-jnp.ones(6))
    with pytest.raises(ValueError, match="labels has shape"):
        jax.jit(lambda lb: U.kto_loss(pol, ref, lb, kl=0.0)[0])(lab[:5])


def test_defaults_come_from_loss_defaults():
    import inspect

    params = inspect.signature(U.kto_loss).parameters
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        assert params[name].default == DEFAULTS[name], name
    params = inspect.signature(U.check_unpaired_options).parameters
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        assert params[name].default == DEFAULTS[name], name


NEW_NAMES = (
    "kto_loss",
    "kto_kl",
    "kto_metric_means",
    "running_moments_init",
    "running_moments_update",
    "check_unpaired_options",
    "UNPAIRED_LOSS_TYPES",
)


def test_top_level_exports_load_only_jax():
    import subprocess
    import sys

    code = (
        "import sys, jdpo; "
        + "; ".join(f"jdpo.{n}" for n in NEW_NAMES)
        + "; print([m for m in ('flax', 'transformers', 'torch', 'optax', 'orbax') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import jdpo

    for name in NEW_NAMES:
        assert getattr(jdpo, name) is getattr(U, name), name
        assert name in jdpo.__all__
