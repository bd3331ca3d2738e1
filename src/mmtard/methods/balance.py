"""Balance rules between teacher terms (spec 2.7): the weights ``lambda_k`` of ``L = sum_k lambda_k L_k``.

A balance is a small state object updated once per step, without gradient, from python floats (so its state is
exact to save and restore). Each rule is one registered class; a new rule is one class here with
``@BALANCES.register(name)`` and its test.

Every rule runs over any number K >= 1 of teachers, keyed by teacher name, in a fixed order: the softmax rules
(``sigmoid``, ``ratio``, ``gap``) are softmaxes over the K terms (for K = 2 the softmax of two logits is the
sigmoid of their difference, so the two-teacher formulas of the spec are these rules at K = 2), ``mtard`` moves
each weight toward its share ``r_k / sum(r)``, ``fixed`` takes a weight per teacher.

Every step the method passes:

- ``terms``: each teacher's term ``L_k`` (the global batch mean under DDP);
- ``shortfalls``: each teacher's accuracy shortfall ``s_k`` on the batch, used by ``gap`` (spec 2.7).

Order within a step: the moving averages are updated with this step's values first (``m_k = L_k`` at the first
step, ``m_k = momentum * m_k + (1 - momentum) * L_k`` afterwards), then the weights are computed from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mmtard.errors import ConfigError
from mmtard.registry import Registry


def softmax(values: Sequence[float]) -> list[float]:
    """A numerically stable softmax of python floats."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def moving_average(ema: dict[str, float], values: Mapping[str, float], momentum: float) -> dict[str, float]:
    """``values`` on the first update (empty ``ema``), ``momentum * ema + (1 - momentum) * values`` afterwards."""
    if not ema:
        return dict(values)
    return {role: momentum * ema[role] + (1 - momentum) * values[role] for role in ema}


class Balance:
    """Weights ``lambda_k`` of the teacher terms.

    Args:
        roles: the teacher names, in a fixed order (e.g. ``("clean", "robust")``).
        momentum: moving-average momentum.
        beta: sharpness of the softmax rules.
        eta: step of the ``mtard`` update.
        fixed: the ``fixed`` rule's weight per teacher (1 for a teacher not listed).
        log_prior: a constant added to each teacher's softmax logit (``log rho`` for every robust-kind teacher,
            0 for the others); softmax rules only.
    """

    uses_prior = False
    sums_to_one = True  # the weights lie in [0, 1] and sum to 1 (a rule's own weights, such as fixed's, need not)

    def __init__(
        self,
        roles: Sequence[str],
        *,
        momentum: float = 0.9,
        beta: float = 5.0,
        eta: float = 0.025,
        fixed: Mapping[str, float] | None = None,
        log_prior: Mapping[str, float] | None = None,
    ):
        if not roles:
            raise ValueError("Balance: needs at least one teacher role")
        self.roles = tuple(roles)
        self.momentum = float(momentum)
        self.beta = float(beta)
        self.eta = float(eta)
        self.fixed = {role: float((fixed or {}).get(role, 1.0)) for role in self.roles}
        self.log_prior = {role: float((log_prior or {}).get(role, 0.0)) for role in self.roles}
        if not self.uses_prior and any(self.log_prior.values()):
            raise ConfigError(f"rho: the '{type(self).__name__}' balance has no prior; use rho 1 or a softmax balance")
        self.step = 0
        self.ema: dict[str, float] = {}
        self.initial: dict[str, float] = {}
        self.shortfall: dict[str, float] = {}

    def update(self, terms: Mapping[str, float], shortfalls: Mapping[str, float] | None = None) -> dict[str, float]:
        """Record this step's teacher terms (and accuracy shortfalls) and return the new ``lambda_k``."""
        values = {role: float(terms[role]) for role in self.roles}
        if self.step == 0:
            self.initial = dict(values)
        self.ema = moving_average(self.ema, values, self.momentum)
        if shortfalls is not None:
            self.shortfall = moving_average(
                self.shortfall, {role: float(shortfalls[role]) for role in self.roles}, self.momentum
            )
        self.step += 1
        return self.weights()

    def weights(self) -> dict[str, float]:
        """``lambda_k`` from the current state."""
        raise NotImplementedError

    def softmax_weights(self, logits: Sequence[float]) -> dict[str, float]:
        """``softmax(logits + log_prior)`` over the roles."""
        return dict(zip(self.roles, softmax([v + self.log_prior[r] for v, r in zip(logits, self.roles)])))

    def ratios(self) -> list[float]:
        """Relative progress ``r_k = m_k / m_k(0)``; ``r_k = 1`` where ``m_k(0) == 0`` (no scale to compare to)."""
        return [self.ema[r] / self.initial[r] if self.initial[r] != 0 else 1.0 for r in self.roles]

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "ema": dict(self.ema),
            "initial": dict(self.initial),
            "shortfall": dict(self.shortfall),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.ema = {r: float(v) for r, v in state["ema"].items()}
        self.initial = {r: float(v) for r, v in state["initial"].items()}
        self.shortfall = {r: float(v) for r, v in state.get("shortfall", {}).items()}


BALANCES: Registry[type[Balance]] = Registry("balance")


@BALANCES.register("sigmoid")
class SigmoidBalance(Balance):
    """``lambda = softmax(beta * m / sum(m) + log prior)``.

    For two teachers: ``lambda_R = sigmoid(beta * (m_R - m_C) / (m_R + m_C) + log rho)``, ``lambda_C = 1 - lambda_R``.
    The teacher the student disagrees with more gets more weight; ``rho`` (default 1) is a prior odds toward the
    robust teacher. Before the first update, and whenever ``sum(m) == 0``, the logits are the prior alone.
    """

    uses_prior = True

    def weights(self) -> dict[str, float]:
        total = sum(self.ema.values())
        if self.step == 0 or total == 0:
            return self.softmax_weights([0.0] * len(self.roles))
        return self.softmax_weights([self.beta * self.ema[r] / total for r in self.roles])


@BALANCES.register("ratio")
class RatioBalance(Balance):
    """``lambda = softmax(beta * r + log prior)`` with ``r_k = m_k / m_k(0)``.

    For two teachers: ``lambda_R = sigmoid(beta * (r_R - r_C) + log rho)``. ``r_k = 1`` where ``m_k(0) == 0``.
    """

    uses_prior = True

    def weights(self) -> dict[str, float]:
        if self.step == 0:
            return self.softmax_weights([0.0] * len(self.roles))
        return self.softmax_weights([self.beta * r for r in self.ratios()])


@BALANCES.register("gap")
class AccuracyGapBalance(Balance):
    """``lambda = softmax(beta * g + log prior)``, ``g_k`` the moving average of teacher ``k``'s accuracy shortfall.

    The shortfall of teacher ``k`` on a batch is how far the student's accuracy falls behind the teacher's, on the
    images that teacher sees (clean images for the clean teacher, ``x'`` for the robust one), relative to the
    teacher's: ``s_k = max(acc_k - acc_S, 0) / acc_k`` (0 when ``acc_k = 0``). For two teachers
    ``lambda_R = sigmoid(beta * (g_R - g_C) + log rho)``: weight goes to the axis on which the student lags its
    teacher more, measured in accuracy, a scale both axes share (the KL terms of a sharp clean teacher and a soft
    robust teacher are not). Before the first update the logits are the prior alone.
    """

    uses_prior = True

    def weights(self) -> dict[str, float]:
        if not self.shortfall:
            return self.softmax_weights([0.0] * len(self.roles))
        return self.softmax_weights([self.beta * self.shortfall[r] for r in self.roles])


@BALANCES.register("mtard")
class MTARDBalance(Balance):
    """MTARD's update: ``w_k <- w_k - eta * (w_k - r_k / sum(r))`` every step, from ``w_k = 1 / K``.

    With two teachers this is ``w_C <- w_C - eta * (w_C - r_C / (r_R + r_C))``, ``lambda_R = 1 - w_C``; for K
    teachers the same update per teacher, so the weights keep summing to 1 (up to rounding). Where
    ``sum(r) == 0`` the target is uniform.
    """

    def __init__(self, roles: Sequence[str], **settings):
        super().__init__(roles, **settings)
        self.current = {r: 1 / len(self.roles) for r in self.roles}

    def update(self, terms: Mapping[str, float], shortfalls: Mapping[str, float] | None = None) -> dict[str, float]:
        super().update(terms, shortfalls)
        ratios = self.ratios()
        total = sum(ratios)
        targets = [r / total if total != 0 else 1 / len(ratios) for r in ratios]
        self.current = {
            role: self.current[role] - self.eta * (self.current[role] - target)
            for role, target in zip(self.roles, targets)
        }
        return self.weights()

    def weights(self) -> dict[str, float]:
        return dict(self.current)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weights": dict(self.current)}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.current = {r: float(v) for r, v in state["weights"].items()}


@BALANCES.register("fixed")
class FixedBalance(Balance):
    """Constant weights from the config, one per teacher (the ``reference`` preset uses 1 and 1)."""

    sums_to_one = False

    def weights(self) -> dict[str, float]:
        return dict(self.fixed)


def create_balance(mode: str, roles: Sequence[str], **settings) -> Balance:
    """The balance rule ``mode`` over ``roles``; ``settings`` are :class:`Balance`'s keyword arguments."""
    return BALANCES.get(mode)(roles, **settings)
