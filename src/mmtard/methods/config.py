"""Method configuration: one typed dataclass, validated, and the presets of spec section 3.

The defaults are the product's MMT-ARD (spec section 2). Each preset is a set of overrides of those
defaults; optimizer settings (learning rate, schedule) belong to the trainer, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from mmtard.attacks.base import NORMS
from mmtard.errors import ConfigError
from mmtard.methods.losses import BALANCE_MODES, DIW_MODES
from mmtard.units import parse_eps

INNER_OBJECTIVES = ("kl-clean-teacher", "kl-robust-teacher", "ce", "fare", "none")

PRESETS: dict[str, dict] = {
    "mmt-ard": {},
    "reference": {
        "inner": "kl-clean-teacher",
        "diw": "reference",
        "balance": "fixed",
        "lambda_robust": 1.0,
        "lambda_clean": 1.0,
        "alpha": 1 / 255,
    },
    # Single teacher: the "fixed" balance with lambda_robust 1 gives loss = mean_i l_R,i.
    "ard": {"inner": "kl-robust-teacher", "diw": "none", "balance": "fixed", "lambda_robust": 1.0},
    # The baselines have no teacher terms; diw/balance are set to their neutral values so the saved
    # resolved config does not suggest a weighting that is not applied.
    "tecoa": {"inner": "ce", "diw": "none", "balance": "fixed"},
    "fare": {"inner": "fare", "diw": "none", "balance": "fixed"},
    "pmg-aft": {"inner": "ce", "diw": "none", "balance": "fixed"},
    "clean-ft": {"inner": "none", "diw": "none", "balance": "fixed", "steps": 0},
}


def _method_names() -> tuple[str, ...]:
    """Registered method names (imported late: the registry imports this module)."""
    from mmtard.methods.registry import list_methods

    return tuple(list_methods())


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field}: expected one of {', '.join(allowed)}; got {value!r}")


def _number(
    field: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Check that ``value`` is a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field}: expected a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{field}: expected a number in {interval}, got {value!r}")


@dataclass
class MethodConfig:
    """Everything a training method needs to compute its loss (spec sections 2 and 3).

    Attributes:
        name: method / preset name (``mmt-ard``, ``reference``, ``ard``, ``tecoa``, ``fare``,
            ``pmg-aft``, ``clean-ft``).
        inner: inner-maximisation objective: ``kl-clean-teacher`` (``KL(P_C(x) || P_S(x + delta))``),
            ``kl-robust-teacher`` (``KL(P_R(x) || P_S(x + delta))``), ``ce`` (cross-entropy with ``y``),
            ``fare`` (squared embedding distance to the original model), ``none`` (no attack).
        diw: dynamic importance weighting: ``cosine``, ``confidence``, ``reference`` or ``none``.
        diw_temperature: ``tau_w`` of the ``confidence`` weighting.
        balance: balance between teacher terms: ``sigmoid``, ``ratio``, ``mtard`` or ``fixed``.
        beta: sharpness of the ``sigmoid`` and ``ratio`` balances.
        ema_momentum: momentum of the moving average of each teacher term.
        eta: step of the ``mtard`` balance update.
        lambda_robust: robust-teacher weight of the ``fixed`` balance.
        lambda_clean: clean-teacher weight of the ``fixed`` balance.
        temperature: ``tau`` in ``P = softmax(z / tau)``.
        logit_scale: ``s`` of every zero-shot classifier, or ``"model"`` for each model's learned scale.
            Stored here; the trainer resolves it when it builds the classifiers.
        eps: attack radius as a fraction of the ``[0, 1]`` pixel range (a string such as ``"4/255"``
            is parsed on construction).
        alpha: PGD step size; ``None`` means ``eps / 4``.
        steps: PGD steps; 0 means no attack (``x' = x``).
        norm: ``linf`` or ``l2``.
        cache_clean_teacher: reuse the clean teacher's logits per dataset index (spec 2.1). Only valid
            for a deterministic data pipeline (no random augmentation); the trainer decides.
        reference_robust_scale: robust-teacher constant of the ``reference`` weighting (50).
        reference_clean_scale: clean-teacher constant of the ``reference`` weighting (5).
    """

    name: str = "mmt-ard"
    inner: str = "kl-clean-teacher"
    diw: str = "cosine"
    diw_temperature: float = 1.0
    balance: str = "sigmoid"
    beta: float = 5.0
    ema_momentum: float = 0.9
    eta: float = 0.025
    lambda_robust: float = 1.0
    lambda_clean: float = 1.0
    temperature: float = 1.0
    logit_scale: float | str = 100.0
    eps: float = 4 / 255
    alpha: float | None = None
    steps: int = 10
    norm: str = "linf"
    cache_clean_teacher: bool = False
    reference_robust_scale: float = 50.0
    reference_clean_scale: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.eps, str):
            self.eps = parse_eps(self.eps, "eps")
        if isinstance(self.alpha, str):
            self.alpha = parse_eps(self.alpha, "alpha")

    @property
    def step_size(self) -> float:
        """The PGD step size: ``alpha``, or ``eps / 4`` when ``alpha`` is ``None``."""
        return self.eps / 4 if self.alpha is None else self.alpha

    def validate(self) -> MethodConfig:
        """Check every field; raise :class:`ConfigError` naming the first bad one. Returns ``self``."""
        _choice("name", self.name, _method_names())
        _choice("inner", self.inner, INNER_OBJECTIVES)
        _choice("diw", self.diw, DIW_MODES)
        _choice("balance", self.balance, BALANCE_MODES)
        _choice("norm", self.norm, NORMS)
        _number("diw_temperature", self.diw_temperature, low=0, low_open=True)
        _number("beta", self.beta)
        _number("ema_momentum", self.ema_momentum, low=0, high=1, high_open=True)
        _number("eta", self.eta, low=0, high=1, low_open=True)
        _number("lambda_robust", self.lambda_robust, low=0)
        _number("lambda_clean", self.lambda_clean, low=0)
        _number("temperature", self.temperature, low=0, low_open=True)
        if self.logit_scale != "model":
            _number("logit_scale", self.logit_scale, low=0, low_open=True)
        _number("eps", self.eps, low=0, high=1)
        if self.alpha is not None:
            _number("alpha", self.alpha, low=0, high=1, low_open=True)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps: expected a whole number >= 0, got {self.steps!r}")
        if not isinstance(self.cache_clean_teacher, bool):
            raise ConfigError(f"cache_clean_teacher: expected true or false, got {self.cache_clean_teacher!r}")
        _number("reference_robust_scale", self.reference_robust_scale)
        _number("reference_clean_scale", self.reference_clean_scale)
        return self


def method_config(preset: str, **overrides: object) -> MethodConfig:
    """The validated config of ``preset`` with ``overrides`` applied on top.

    ``preset`` is any registered method name; its overrides come from :data:`PRESETS` (none if absent).

    Raises:
        ConfigError: unknown preset, unknown field, or an invalid value.
    """
    _choice("method", preset, _method_names())
    known = {f.name for f in fields(MethodConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"method: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    values = {"name": preset, **PRESETS.get(preset, {}), **overrides}
    return MethodConfig(**values).validate()
