"""Loss building blocks of spec section 2: per-sample KL, dynamic importance weighting (DIW) and the
balance rules between teachers.

The tensor functions are pure. The balances are small state objects (moving averages across steps) that
work on python floats, so that their state is exact to save and restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mmtard.errors import ConfigError

DIW_MODES = ("cosine", "confidence", "reference", "none")
BALANCE_MODES = ("sigmoid", "ratio", "mtard", "fixed")


def per_sample_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(P || Q)`` per sample, ``P = softmax(target / tau)``, ``Q = softmax(student / tau)``.

    No ``tau**2`` factor (spec section 1). Gradients flow into both arguments where they require them.

    Args:
        target_logits: ``(B, K)`` logits of the distribution ``P``.
        student_logits: ``(B, K)`` logits of the distribution ``Q``.
        temperature: ``tau``.

    Returns:
        ``(B,)`` per-sample divergences.
    """
    if target_logits.shape != student_logits.shape:
        raise ValueError(
            f"per_sample_kl: logits must have the same shape (same label set), got "
            f"{tuple(target_logits.shape)} and {tuple(student_logits.shape)}"
        )
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def cross_entropy_objective(
    model: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``ce`` inner objective: ``x' -> CE(z(x'), y)`` per sample, for PGD to maximise (TeCoA, PMG-AFT)."""
    return lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="none")


def squared_distance(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||features_i - target_i||_2^2`` per sample (sum over the embedding dimensions), shape ``(B,)``."""
    if features.shape != target.shape:
        raise ConfigError(
            f"teachers['original']: its embeddings {tuple(target.shape)} must match the student's "
            f"{tuple(features.shape)} (FARE compares unnormalised embeddings of the same architecture)"
        )
    return (features.float() - target.float()).pow(2).sum(dim=-1)


def true_class_cosine(logits: torch.Tensor, y: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``cos(e(x_i), t_{y_i})`` read from zero-shot logits ``z = s * e @ T^T``: ``z[i, y_i] / s``."""
    return logits.detach().float().gather(1, y.view(-1, 1)).squeeze(1) / logit_scale


def true_class_probability(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(z / tau_w)[i, y_i]``, shape ``(B,)``."""
    return F.softmax(logits.detach().float() / temperature, dim=-1).gather(1, y.view(-1, 1)).squeeze(1)


def normalize_by_batch_mean(
    signal: torch.Tensor, batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean
) -> torch.Tensor:
    """``signal / mean(signal)`` so the weights average 1; all ones when the batch mean is 0.

    ``batch_mean`` computes the mean; under DistributedDataParallel the trainer passes the mean over the
    whole global batch, so every process divides by the same number as a single process would.
    """
    mean = batch_mean(signal)
    # torch.where instead of a python branch: no device synchronisation (the unused branch may be nan).
    return torch.where(mean == 0, torch.ones_like(signal), signal / mean)


@torch.no_grad()
def importance_weights(
    mode: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    logit_scale: float,
    temperature: float = 1.0,
    reference_scale: float = 1.0,
    batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample DIW weights of one teacher (spec 2.6), without gradient.

    Args:
        mode: ``cosine`` (``max(cos, 0)`` over its batch mean), ``confidence`` (true-class probability at
            temperature ``tau_w`` over its batch mean), ``reference`` (``reference_scale * cos``, neither
            normalised nor clamped) or ``none`` (ones).
        logits: ``(B, K)`` the teacher's logits on the input it saw.
        y: ``(B,)`` true labels in the teacher's label set.
        logit_scale: the teacher's logit scale ``s``, to read cosines from its logits.
        temperature: ``tau_w`` of the ``confidence`` mode.
        reference_scale: constant of the ``reference`` mode (50 robust, 5 clean in the released script).
        batch_mean: the batch mean used for normalisation (the global batch's under DDP).

    Returns:
        ``(weights, signal)``: the ``(B,)`` weights, and the ``(B,)`` raw signal to log (the
        true-class probability in ``confidence`` mode, the true-class cosine in every other mode).
    """
    if mode == "confidence":
        signal = true_class_probability(logits, y, temperature)
        return normalize_by_batch_mean(signal, batch_mean), signal
    cosine = true_class_cosine(logits, y, logit_scale)
    if mode == "cosine":
        return normalize_by_batch_mean(cosine.clamp_min(0), batch_mean), cosine
    if mode == "reference":
        return reference_scale * cosine, cosine
    if mode == "none":
        return torch.ones_like(cosine), cosine
    raise ConfigError(f"diw: expected one of {', '.join(DIW_MODES)}; got {mode!r}")


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


class Balance:
    """Weights ``lambda_k`` of the teacher terms, updated once per step from the terms ``L_k``.

    Order within a step (spec 2.7): the moving averages are updated with this step's terms first
    (``m_k = L_k`` at the first step, ``m_k = momentum * m_k + (1 - momentum) * L_k`` afterwards), then
    the weights are computed from the updated averages.

    Args:
        roles: the teachers, in a fixed order (e.g. ``("clean", "robust")``).
        momentum: moving-average momentum.
    """

    def __init__(self, roles: Sequence[str], momentum: float = 0.9):
        if not roles:
            raise ValueError("Balance: needs at least one teacher role")
        self.roles = tuple(roles)
        self.momentum = float(momentum)
        self.step = 0
        self.ema: dict[str, float] = {}
        self.initial: dict[str, float] = {}

    def update(self, terms: Mapping[str, float]) -> dict[str, float]:
        """Record this step's teacher terms (floats, no gradient) and return the new ``lambda_k``."""
        values = {role: float(terms[role]) for role in self.roles}
        if self.step == 0:
            self.ema = dict(values)
            self.initial = dict(values)
        else:
            self.ema = {r: self.momentum * self.ema[r] + (1 - self.momentum) * values[r] for r in self.roles}
        self.step += 1
        return self.weights()

    def weights(self) -> dict[str, float]:
        """``lambda_k`` from the current state."""
        raise NotImplementedError

    def ratios(self) -> list[float]:
        """Relative progress ``r_k = m_k / m_k(0)``; ``r_k = 1`` where ``m_k(0) == 0`` (no scale to compare to)."""
        return [self.ema[r] / self.initial[r] if self.initial[r] != 0 else 1.0 for r in self.roles]

    def state_dict(self) -> dict:
        return {"step": self.step, "ema": dict(self.ema), "initial": dict(self.initial)}

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.ema = {r: float(v) for r, v in state["ema"].items()}
        self.initial = {r: float(v) for r, v in state["initial"].items()}


class SigmoidBalance(Balance):
    """``lambda = softmax(beta * m / sum(m))``.

    For two teachers this is ``lambda_R = sigmoid(beta * (m_R - m_C) / (m_R + m_C))``, ``lambda_C = 1 - lambda_R``.

    The teacher the student disagrees with more gets more weight. Before the first update, and whenever
    ``sum(m) == 0``, the weights are uniform.
    """

    def __init__(self, roles: Sequence[str], momentum: float = 0.9, beta: float = 5.0):
        super().__init__(roles, momentum)
        self.beta = float(beta)

    def weights(self) -> dict[str, float]:
        if self.step == 0 or sum(self.ema.values()) == 0:
            return {r: 1 / len(self.roles) for r in self.roles}
        total = sum(self.ema[r] for r in self.roles)
        return dict(zip(self.roles, _softmax([self.beta * self.ema[r] / total for r in self.roles])))


class RatioBalance(Balance):
    """``lambda = softmax(beta * r)`` with ``r_k = m_k / m_k(0)``.

    For two teachers this is ``lambda_R = sigmoid(beta * (r_R - r_C))``. ``r_k = 1`` where ``m_k(0) == 0``.
    """

    def __init__(self, roles: Sequence[str], momentum: float = 0.9, beta: float = 5.0):
        super().__init__(roles, momentum)
        self.beta = float(beta)

    def weights(self) -> dict[str, float]:
        if self.step == 0:
            return {r: 1 / len(self.roles) for r in self.roles}
        return dict(zip(self.roles, _softmax([self.beta * r for r in self.ratios()])))


class MTARDBalance(Balance):
    """MTARD's update: ``w_k <- w_k - eta * (w_k - r_k / sum(r))`` every step, from ``w_k = 1 / K``.

    With two teachers this is ``w_C <- w_C - eta * (w_C - r_C / (r_R + r_C))``, ``lambda_R = 1 - w_C``.
    Where ``sum(r) == 0`` the target is uniform.
    """

    def __init__(self, roles: Sequence[str], momentum: float = 0.9, eta: float = 0.025):
        super().__init__(roles, momentum)
        self.eta = float(eta)
        self.current = {r: 1 / len(self.roles) for r in self.roles}

    def update(self, terms: Mapping[str, float]) -> dict[str, float]:
        super().update(terms)
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


class FixedBalance(Balance):
    """Constant weights from the config (the ``reference`` preset uses 1 and 1)."""

    def __init__(self, roles: Sequence[str], fixed: Mapping[str, float], momentum: float = 0.9):
        super().__init__(roles, momentum)
        self.fixed = {r: float(fixed[r]) for r in self.roles}

    def weights(self) -> dict[str, float]:
        return dict(self.fixed)


def create_balance(
    mode: str,
    roles: Sequence[str],
    *,
    beta: float = 5.0,
    momentum: float = 0.9,
    eta: float = 0.025,
    fixed: Mapping[str, float] | None = None,
) -> Balance:
    """The balance rule ``mode`` over ``roles`` (``fixed`` needs a weight per role in ``fixed``)."""
    if mode == "sigmoid":
        return SigmoidBalance(roles, momentum, beta)
    if mode == "ratio":
        return RatioBalance(roles, momentum, beta)
    if mode == "mtard":
        return MTARDBalance(roles, momentum, eta)
    if mode == "fixed":
        if fixed is None:
            raise ValueError("create_balance: the fixed balance needs its weights")
        return FixedBalance(roles, fixed, momentum)
    raise ConfigError(f"balance: expected one of {', '.join(BALANCE_MODES)}; got {mode!r}")
