"""Every formula of mmtard.methods.losses against a hand computation written out from spec section 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmtard.errors import ConfigError
from mmtard.methods.balance import (
    AccuracyGapBalance,
    FixedBalance,
    MTARDBalance,
    RatioBalance,
    SigmoidBalance,
    create_balance,
)
from mmtard.methods.losses import accuracy_shortfall, batch_accuracy, per_sample_kl
from mmtard.methods.weighting import WeightingSettings, importance_weights

TOL = 1e-5
TEACHER = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
STUDENT = [[0.0, 1.0, 0.5], [1.5, -0.5, 0.0]]


def np_softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


# ---------------------------------------------------------------- per-sample KL


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_per_sample_kl_matches_explicit_sum(tau):
    expected = []
    for t_row, s_row in zip(TEACHER, STUDENT):
        p, q = np_softmax(t_row, tau), np_softmax(s_row, tau)
        expected.append(sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q)))
    got = per_sample_kl(torch.tensor(TEACHER), torch.tensor(STUDENT), tau)
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), expected, atol=TOL)


def test_per_sample_kl_is_zero_for_equal_inputs_and_rejects_shape_mismatch():
    z = torch.tensor(TEACHER)
    assert per_sample_kl(z, z).abs().max() < TOL
    with pytest.raises(ValueError):
        per_sample_kl(z, z[:, :2])


# ---------------------------------------------------------------- DIW

# Logits with scale s = 10: true-class cosines are logits[i, y_i] / 10.
S = 10.0
LOGITS = torch.tensor([[5.0, 1.0, 0.0], [2.0, -3.0, 1.0], [0.0, 4.0, 8.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([0, 1, 2, 0])
COS = [0.5, -0.3, 0.8, 0.1]  # written out by hand from LOGITS and Y


def test_diw_cosine_clamps_negatives_and_normalises_by_batch_mean():
    clamped = [max(c, 0.0) for c in COS]
    mean = sum(clamped) / 4
    weights, signal = importance_weights("cosine", LOGITS, Y, WeightingSettings(logit_scale=S))
    np.testing.assert_allclose(weights.numpy(), [c / mean for c in clamped], atol=TOL)
    np.testing.assert_allclose(signal.numpy(), COS, atol=TOL)  # raw, unclamped cosine is logged
    assert weights[1] == 0


def test_diw_cosine_all_nonpositive_batch_gives_ones():
    logits = torch.tensor([[-5.0, 1.0], [0.0, 2.0]])
    weights, _ = importance_weights("cosine", logits, torch.tensor([0, 0]), WeightingSettings(logit_scale=S))
    np.testing.assert_allclose(weights.numpy(), [1.0, 1.0], atol=TOL)


@pytest.mark.parametrize("tau_w", [1.0, 3.0])
def test_diw_confidence_uses_true_class_probability_at_tau_w(tau_w):
    probs = [np_softmax(row, tau_w)[label] for row, label in zip(LOGITS.tolist(), Y.tolist())]
    mean = sum(probs) / len(probs)
    weights, signal = importance_weights("confidence", LOGITS, Y, WeightingSettings(logit_scale=S, temperature=tau_w))
    np.testing.assert_allclose(weights.numpy(), [p / mean for p in probs], atol=TOL)
    np.testing.assert_allclose(signal.numpy(), probs, atol=TOL)


@pytest.mark.parametrize("scale", [50.0, 5.0])
def test_diw_reference_is_scaled_cosine_not_normalised_nor_clamped(scale):
    weights, signal = importance_weights(
        "reference", LOGITS, Y, WeightingSettings(logit_scale=S, reference_scale=scale)
    )
    np.testing.assert_allclose(weights.numpy(), [scale * c for c in COS], atol=1e-4)
    assert weights[1] < 0


def test_diw_none_is_ones():
    weights, signal = importance_weights("none", LOGITS, Y, WeightingSettings(logit_scale=S))
    np.testing.assert_allclose(weights.numpy(), [1.0] * 4, atol=TOL)
    np.testing.assert_allclose(signal.numpy(), COS, atol=TOL)


def test_diw_unknown_mode():
    with pytest.raises(ConfigError, match="diw"):
        importance_weights("entropy", LOGITS, Y, WeightingSettings(logit_scale=S))


def test_diw_has_no_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    weights, _ = importance_weights("cosine", logits, Y, WeightingSettings(logit_scale=S))
    assert not weights.requires_grad


# ---------------------------------------------------------------- balance

# (L_R, L_C) over four steps.
TERMS = [(0.8, 0.2), (0.6, 0.4), (0.3, 0.5), (0.9, 0.1)]


def hand_emas(momentum=0.9):
    """EMA after each step, started at the first value."""
    out = []
    m_r, m_c = TERMS[0]
    out.append((m_r, m_c))
    for l_r, l_c in TERMS[1:]:
        m_r = momentum * m_r + (1 - momentum) * l_r
        m_c = momentum * m_c + (1 - momentum) * l_c
        out.append((m_r, m_c))
    return out


def run(balance):
    return [balance.update({"robust": l_r, "clean": l_c}) for l_r, l_c in TERMS]


def test_sigmoid_balance_over_steps():
    beta = 5.0
    got = run(SigmoidBalance(("clean", "robust"), momentum=0.9, beta=beta))
    for lambdas, (m_r, m_c) in zip(got, hand_emas()):
        expected = sigmoid(beta * (m_r - m_c) / (m_r + m_c))
        assert abs(lambdas["robust"] - expected) < TOL
        assert abs(lambdas["clean"] - (1 - expected)) < TOL
    # the first step uses the first values themselves (EMA started at the first value)
    assert abs(got[0]["robust"] - sigmoid(beta * 0.6 / 1.0)) < TOL


def test_sigmoid_k_teacher_form_equals_two_teacher_form():
    beta = 3.0
    k_form = SigmoidBalance(("robust", "clean"), beta=beta).update({"robust": 0.7, "clean": 0.25})
    assert abs(k_form["robust"] - sigmoid(beta * (0.7 - 0.25) / 0.95)) < TOL
    three = SigmoidBalance(("a", "b", "c"), beta=beta).update({"a": 1.0, "b": 2.0, "c": 3.0})
    exps = [math.exp(beta * v / 6.0) for v in (1.0, 2.0, 3.0)]
    for name, e in zip("abc", exps):
        assert abs(three[name] - e / sum(exps)) < TOL


def test_sigmoid_zero_guard():
    lambdas = SigmoidBalance(("clean", "robust")).update({"robust": 0.0, "clean": 0.0})
    assert lambdas == {"clean": 0.5, "robust": 0.5}


def test_ratio_balance_over_steps():
    beta = 5.0
    got = run(RatioBalance(("clean", "robust"), momentum=0.9, beta=beta))
    m0_r, m0_c = TERMS[0]
    for lambdas, (m_r, m_c) in zip(got, hand_emas()):
        expected = sigmoid(beta * (m_r / m0_r - m_c / m0_c))
        assert abs(lambdas["robust"] - expected) < TOL
        assert abs(lambdas["clean"] - (1 - expected)) < TOL
    assert abs(got[0]["robust"] - 0.5) < TOL  # r = 1 for both at the first step


def test_ratio_zero_initial_value_counts_as_no_progress():
    balance = RatioBalance(("clean", "robust"), beta=5.0)
    balance.update({"robust": 0.5, "clean": 0.0})
    lambdas = balance.update({"robust": 0.25, "clean": 0.3})
    r_r = (0.9 * 0.5 + 0.1 * 0.25) / 0.5
    assert abs(lambdas["robust"] - sigmoid(5.0 * (r_r - 1.0))) < TOL


def test_mtard_balance_over_steps():
    eta = 0.025
    got = run(MTARDBalance(("clean", "robust"), momentum=0.9, eta=eta))
    m0_r, m0_c = TERMS[0]
    w_c = 0.5
    for lambdas, (m_r, m_c) in zip(got, hand_emas()):
        r_r, r_c = m_r / m0_r, m_c / m0_c
        w_c = w_c - eta * (w_c - r_c / (r_r + r_c))
        assert abs(lambdas["clean"] - w_c) < TOL
        assert abs(lambdas["robust"] - (1 - w_c)) < TOL
    assert got[-1]["clean"] != 0.5  # it moved


def test_mtard_zero_guard():
    balance = MTARDBalance(("clean", "robust"), momentum=0.9, eta=0.5)
    balance.load_state_dict(
        {
            "step": 1,
            "ema": {"clean": 0.0, "robust": 0.0},
            "initial": {"clean": 1.0, "robust": 1.0},
            "weights": {"clean": 0.3, "robust": 0.7},
        }
    )
    lambdas = balance.update({"robust": 0.0, "clean": 0.0})  # r_R + r_C == 0: the target is 1/2
    assert abs(lambdas["clean"] - (0.3 - 0.5 * (0.3 - 0.5))) < TOL
    assert abs(lambdas["robust"] - (0.7 - 0.5 * (0.7 - 0.5))) < TOL


def test_fixed_balance():
    got = run(FixedBalance(("clean", "robust"), fixed={"robust": 1.0, "clean": 0.3}))
    assert all(lambdas == {"robust": 1.0, "clean": 0.3} for lambdas in got)


@pytest.mark.parametrize("rho", [1.0, 9.0, 0.25])
def test_sigmoid_balance_with_a_robust_prior_over_steps(rho):
    """lambda_R = sigmoid(beta * (m_R - m_C) / (m_R + m_C) + log rho)."""
    beta = 5.0
    got = run(SigmoidBalance(("clean", "robust"), momentum=0.9, beta=beta, log_prior={"robust": math.log(rho)}))
    for lambdas, (m_r, m_c) in zip(got, hand_emas()):
        expected = sigmoid(beta * (m_r - m_c) / (m_r + m_c) + math.log(rho))
        assert abs(lambdas["robust"] - expected) < TOL
        assert abs(lambdas["clean"] - (1 - expected)) < TOL


def test_sigmoid_prior_alone_before_the_first_step_and_at_zero_terms():
    balance = SigmoidBalance(("clean", "robust"), log_prior={"robust": math.log(9.0)})
    assert abs(balance.weights()["robust"] - 0.9) < TOL
    assert abs(balance.update({"robust": 0.0, "clean": 0.0})["robust"] - 0.9) < TOL


def test_ratio_balance_with_a_robust_prior():
    balance = RatioBalance(("clean", "robust"), beta=5.0, log_prior={"robust": math.log(4.0)})
    balance.update({"robust": 0.8, "clean": 0.2})
    lambdas = balance.update({"robust": 0.6, "clean": 0.4})
    r_r, r_c = (0.9 * 0.8 + 0.1 * 0.6) / 0.8, (0.9 * 0.2 + 0.1 * 0.4) / 0.2
    assert abs(lambdas["robust"] - sigmoid(5.0 * (r_r - r_c) + math.log(4.0))) < TOL


# (shortfall_R, shortfall_C) over four steps.
SHORTFALLS = [(1.0, 0.05), (0.8, 0.1), (0.5, 0.2), (0.3, 0.25)]


@pytest.mark.parametrize("rho", [1.0, 3.0])
def test_gap_balance_over_steps(rho):
    """lambda_R = sigmoid(beta * (g_R - g_C) + log rho), g the EMA of the accuracy shortfalls."""
    beta, momentum = 4.0, 0.9
    balance = AccuracyGapBalance(("clean", "robust"), momentum=momentum, beta=beta, log_prior={"robust": math.log(rho)})
    assert abs(balance.weights()["robust"] - rho / (1 + rho)) < TOL  # the prior alone before any step
    g_r, g_c = SHORTFALLS[0]
    for step, ((l_r, l_c), (s_r, s_c)) in enumerate(zip(TERMS, SHORTFALLS)):
        lambdas = balance.update({"robust": l_r, "clean": l_c}, {"robust": s_r, "clean": s_c})
        if step:
            g_r, g_c = momentum * g_r + (1 - momentum) * s_r, momentum * g_c + (1 - momentum) * s_c
        expected = sigmoid(beta * (g_r - g_c) + math.log(rho))
        assert abs(lambdas["robust"] - expected) < TOL
        assert abs(lambdas["clean"] - (1 - expected)) < TOL


def test_accuracy_shortfall_hand_values():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])  # predicts 0, 1, 0, 0
    student = torch.tensor([[0.0, 2.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])  # predicts 1, 1, 0, 1
    y = torch.tensor([0, 1, 0, 1])
    t_acc, s_acc = batch_accuracy(teacher, y), batch_accuracy(student, y)
    assert t_acc.item() == 0.75 and s_acc.item() == 0.75
    assert accuracy_shortfall(torch.tensor(0.8), torch.tensor(0.2)).item() == pytest.approx((0.8 - 0.2) / 0.8)
    assert accuracy_shortfall(torch.tensor(0.5), torch.tensor(0.9)).item() == 0.0  # ahead of the teacher
    assert accuracy_shortfall(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0  # teacher never right


@pytest.mark.parametrize("mode", ["mtard", "fixed"])
def test_a_prior_on_a_balance_without_one_is_refused(mode):
    with pytest.raises(ConfigError, match="rho"):
        create_balance(mode, ("clean", "robust"), log_prior={"robust": math.log(9.0)})


@pytest.mark.parametrize("mode", ["sigmoid", "ratio", "gap", "mtard", "fixed"])
def test_balance_state_round_trip(mode):
    fixed = {"robust": 1.0, "clean": 1.0}
    first = create_balance(mode, ("clean", "robust"), fixed=fixed)
    for (l_r, l_c), (s_r, s_c) in zip(TERMS[:3], SHORTFALLS):
        first.update({"robust": l_r, "clean": l_c}, {"robust": s_r, "clean": s_c})
    second = create_balance(mode, ("clean", "robust"), fixed=fixed)
    second.load_state_dict(first.state_dict())
    step = ({"robust": 0.9, "clean": 0.1}, {"robust": 0.2, "clean": 0.4})
    assert second.update(*step) == first.update(*step)


def test_create_balance_unknown_mode():
    with pytest.raises(ConfigError, match="balance"):
        create_balance("softmax", ("clean", "robust"))
