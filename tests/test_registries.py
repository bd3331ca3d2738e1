"""Property tests over every entry of the extension registries: a new DIW mode, balance rule or inner objective is
picked up here without edits (its own formula is checked by its hand-computation test).

- DIW (spec 2.6): weights are ``(B,)``, finite, without gradient; non-negative with batch mean 1 unless the mode is
  one of ``UNNORMALISED_MODES`` (``reference``: the released script's raw cosines).
- Balances (spec 2.7): after any sequence of teacher terms, for 1, 2 or 3 teachers, every ``lambda_k`` lies in
  ``[0, 1]`` and they sum to 1 (a rule with ``sums_to_one = False``, ``fixed``, returns its configured weights);
  a state saved and loaded continues as the original.
- Inner objectives (spec 2.2): ``None`` (no attack) or a per-sample loss of the perturbed images, ``(B,)``, finite,
  non-negative and differentiable in the images.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmtard.methods import BALANCES, DIW_MODES, INNER_OBJECTIVES, create_balance, importance_weights
from mmtard.methods.inner import InnerContext
from mmtard.methods.weighting import UNNORMALISED_MODES, WeightingSettings

BATCH, CLASSES, SCALE = 12, 5, 100.0


def teacher_logits(seed: int, sharpness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``s * cos`` of a zero-shot teacher (cosines in [-1, 1]) and labels, some of them misclassified."""
    generator = torch.Generator().manual_seed(seed)
    cosines = torch.tanh(sharpness * torch.randn(BATCH, CLASSES, generator=generator))
    return SCALE * cosines, torch.randint(0, CLASSES, (BATCH,), generator=generator)


@pytest.mark.parametrize("mode", DIW_MODES.names())
@pytest.mark.parametrize("seed", range(3))
def test_every_diw_mode_gives_finite_weights_that_average_one_where_normalised(mode, seed):
    logits, y = teacher_logits(seed)
    settings = WeightingSettings(logit_scale=SCALE, temperature=2.0, reference_scale=5.0)
    weights, signal = importance_weights(mode, logits.requires_grad_(), y, settings)
    assert weights.shape == signal.shape == (BATCH,) and not weights.requires_grad
    assert torch.isfinite(weights).all() and torch.isfinite(signal).all()
    if mode not in UNNORMALISED_MODES:
        assert (weights >= 0).all()
        assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", sorted(set(DIW_MODES.names()) - UNNORMALISED_MODES))
def test_every_normalised_diw_mode_divides_by_the_given_batch_mean(mode):
    """The batch mean is the one of the settings (the global batch's under DDP): doubling it halves the weights."""
    logits, y = teacher_logits(0)
    local = importance_weights(mode, logits, y, WeightingSettings(logit_scale=SCALE))[0]
    doubled = WeightingSettings(logit_scale=SCALE, batch_mean=lambda value: 2 * value.mean())
    weights = importance_weights(mode, logits, y, doubled)[0]
    if torch.equal(local, torch.ones_like(local)) and torch.equal(weights, local):
        return  # a mode of constant weights (none) has no batch mean to divide by
    assert torch.allclose(weights, local / 2)


def balance_terms(seed: int, roles: tuple[str, ...], steps: int = 6) -> list[tuple[dict, dict]]:
    """``steps`` random teacher terms and accuracy shortfalls, one zero term among them."""
    generator = torch.Generator().manual_seed(seed)
    terms = torch.rand(steps, len(roles), generator=generator) * 3
    terms[steps // 2, 0] = 0.0
    shortfalls = torch.rand(steps, len(roles), generator=generator)
    return [(dict(zip(roles, map(float, t))), dict(zip(roles, map(float, s)))) for t, s in zip(terms, shortfalls)]


ROLE_SETS = [("robust",), ("clean", "robust"), ("clean", "robust", "fare")]


@pytest.mark.parametrize("mode", BALANCES.names())
@pytest.mark.parametrize("roles", ROLE_SETS, ids=len)
def test_every_balance_gives_weights_in_unit_interval_summing_to_one(mode, roles):
    prior = {"robust": math.log(3.0)} if BALANCES.get(mode).uses_prior else {}
    fixed = {role: 0.5 + i for i, role in enumerate(roles)}
    balance = create_balance(mode, roles, momentum=0.5, beta=5.0, eta=0.1, fixed=fixed, log_prior=prior)
    for terms, shortfalls in [({}, {}), *balance_terms(len(roles), roles)]:
        weights = balance.update(terms, shortfalls) if terms else balance.weights()
        assert list(weights) == list(roles)
        assert all(math.isfinite(w) for w in weights.values()), weights
        if BALANCES.get(mode).sums_to_one:
            assert all(0.0 <= w <= 1.0 for w in weights.values()), weights
            assert sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
        else:
            assert weights == fixed


@pytest.mark.parametrize("mode", BALANCES.names())
def test_every_balance_resumes_from_its_state_as_the_original(mode):
    roles = ("clean", "robust", "fare")
    steps = balance_terms(7, roles)
    original = create_balance(mode, roles)
    for terms, shortfalls in steps[:3]:
        original.update(terms, shortfalls)
    resumed = create_balance(mode, roles)
    resumed.load_state_dict(original.state_dict())
    for terms, shortfalls in steps[3:]:
        assert resumed.update(terms, shortfalls) == original.update(terms, shortfalls)


class TinyClassifier(nn.Module):
    """Pixels to logits and features: a linear image tower on 4x4 images."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3 * 4 * 4, 6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.visual(x.flatten(1))
        return features if return_features else SCALE * self.head(features).tanh()


@pytest.mark.parametrize("name", INNER_OBJECTIVES.names())
def test_every_inner_objective_is_a_finite_non_negative_per_sample_loss(name):
    torch.manual_seed(0)
    model, frozen = TinyClassifier(), TinyClassifier()
    x = torch.rand(BATCH, 3, 4, 4)
    y = torch.randint(0, CLASSES, (BATCH,))
    with torch.no_grad():
        logits, features = frozen(x), frozen(x, return_features=True)
    context = InnerContext(model, y, 1.0, teacher_logits=lambda name: logits, teacher_features=lambda name: features)
    loss_fn = INNER_OBJECTIVES.get(name)(context)
    if loss_fn is None:  # no attack
        return
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1).requires_grad_()
    loss = loss_fn(x_adv)
    assert loss.shape == (BATCH,)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    (gradient,) = torch.autograd.grad(loss.sum(), x_adv)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
