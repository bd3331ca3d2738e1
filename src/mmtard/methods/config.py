"""Method configuration: one typed dataclass, validated.

The defaults are the product's MMT-ARD (spec section 2). Each preset (spec section 3) is a set of overrides of
those defaults, registered with its method class (``register_method(name, **preset)``); optimizer settings
(learning rate, schedule) belong to the trainer, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike

from mmtard.attacks.base import NORMS
from mmtard.attacks.pgd import DEFAULT_ALPHA_FRACTION
from mmtard.errors import ConfigError
from mmtard.methods.balance import BALANCES
from mmtard.methods.inner import INNER_OBJECTIVES
from mmtard.methods.teachers import STANDARD_LAMBDA_FIELDS
from mmtard.methods.weighting import DIW_MODES
from mmtard.units import RADIUS, parse_eps
from mmtard.validate import check_choice, check_number

ROBUST_TARGETS = ("adversarial", "clean")
CLEAN_INPUTS = ("clean", "adversarial", "both")


@dataclass
class MethodConfig:
    """Everything a training method needs to compute its loss (spec sections 2 and 3).

    Attributes:
        name: method / preset name (``mmt-ard``, ``reference``, ``ard``, ``tecoa``, ``fare``,
            ``pmg-aft``, ``clean-ft``).
        inner: inner-maximisation objective: ``kl-clean-teacher`` (``KL(P_C(x) || P_S(x + delta))``),
            ``kl-robust-teacher`` (``KL(P_R(x) || P_S(x + delta))``), ``ce`` (cross-entropy with ``y``),
            ``fare`` (squared embedding distance to the original model), ``none`` (no attack).
        inner_teacher: the teacher (by name) whose clean-image logits a ``kl-*`` inner objective uses, of the
            objective's kind; ``None``: the first teacher of that kind, in the teachers' order (the standard
            ``clean`` or ``robust`` teacher with two teachers).
        diw: dynamic importance weighting: ``cosine``, ``confidence``, ``reference`` or ``none``.
        diw_temperature: ``tau_w`` of the ``confidence`` weighting.
        balance: balance between teacher terms: ``sigmoid``, ``ratio``, ``gap``, ``mtard`` or ``fixed``.
        beta: sharpness of the ``sigmoid``, ``ratio`` and ``gap`` balances.
        rho: prior odds toward the robust teacher of the softmax balances (``sigmoid``, ``ratio``, ``gap``):
            ``log rho`` is added to the logit of every robust-kind teacher; 1 means no prior.
        ema_momentum: momentum of the moving average of each teacher term.
        eta: step of the ``mtard`` balance update.
        lambda_robust: robust-teacher weight of the ``fixed`` balance.
        lambda_clean: clean-teacher weight of the ``fixed`` balance.
        lambdas: teacher name -> weight of the ``fixed`` balance, for teachers other than the standard ``robust``
            and ``clean`` (which take ``lambda_robust`` and ``lambda_clean``); a teacher not listed weighs 1.
        robust_target: what the robust term distils: ``adversarial`` (``P_R(x')``, spec 2.5) or ``clean``
            (``P_R(x)``, the robust teacher on the clean images, as RSLAD).
        clean_input: which student output a clean teacher's term distils into: ``clean`` (``P_S(x)``, spec 2.5)
            or ``adversarial`` (``P_S(x')``: the clean teacher's ``P_C(x)`` as a soft label for the adversarial
            image, like TRADES / TeCoA with the clean teacher's distribution in place of the label; the step then
            runs no clean student forward) or ``both`` (the mean of the two per-sample KLs).
        temperature: ``tau`` in ``P = softmax(z / tau)``.
        logit_scale: ``s`` of every zero-shot classifier, or ``"model"`` for each model's learned scale.
            Stored here; the trainer resolves it when it builds the classifiers.
        eps: attack radius as a fraction of the ``[0, 1]`` pixel range (a string such as ``"4/255"``
            is parsed on construction).
        alpha: PGD step size; ``None`` means ``eps / 4``.
        steps: PGD steps; 0 means no attack (``x' = x``).
        norm: ``linf`` or ``l2``.
        cache_clean_teacher: reuse the teachers' logits on clean images per dataset index (spec 2.1): the clean
            teacher's, and the robust teacher's when a term or the inner objective uses ``P_R(x)``. Only valid
            for a deterministic data pipeline (no random augmentation); the trainer decides.
        cache_dir: with ``cache_clean_teacher``, keep those logits in a disk-backed fp16 memory-mapped store
            (:class:`~mmtard.methods.logit_cache.LogitCache`), one folder per teacher name under this folder, reused by
            later runs of the same teacher, data and classes; ``None`` keeps them in memory (float32).
        reference_robust_scale: robust-teacher constant of the ``reference`` weighting (50).
        reference_clean_scale: clean-teacher constant of the ``reference`` weighting (5).
    """

    name: str = "mmt-ard"
    inner: str = "kl-clean-teacher"
    inner_teacher: str | None = None
    diw: str = "cosine"
    diw_temperature: float = 1.0
    balance: str = "sigmoid"
    beta: float = 5.0
    rho: float = 1.0
    ema_momentum: float = 0.9
    eta: float = 0.025
    lambda_robust: float = 1.0
    lambda_clean: float = 1.0
    lambdas: dict[str, float] | None = None
    robust_target: str = "adversarial"
    clean_input: str = "clean"
    temperature: float = 1.0
    logit_scale: float | str = 100.0
    eps: float = field(default=4 / 255, metadata=RADIUS)
    alpha: float | None = field(default=None, metadata=RADIUS)
    steps: int = 10
    norm: str = "linf"
    cache_clean_teacher: bool = False
    cache_dir: str | None = None
    reference_robust_scale: float = 50.0
    reference_clean_scale: float = 5.0

    def __post_init__(self) -> None:
        norm = self.norm if self.norm in NORMS else "linf"  # a wrong norm is reported by validate()
        if isinstance(self.eps, str):
            self.eps = parse_eps(self.eps, "eps", norm)
        if isinstance(self.alpha, str):
            self.alpha = parse_eps(self.alpha, "alpha", norm)

    @property
    def attacking(self) -> bool:
        """Whether a step perturbs its inputs (not with ``inner: none``, ``steps: 0`` or ``eps: 0``)."""
        return self.inner != "none" and self.steps > 0 and self.eps > 0

    @property
    def step_size(self) -> float:
        """The PGD step size: ``alpha``, or ``eps / 4`` when ``alpha`` is ``None``."""
        return self.eps * DEFAULT_ALPHA_FRACTION if self.alpha is None else self.alpha

    def validate(self) -> MethodConfig:
        """Check every field; raise :class:`ConfigError` naming the first bad one. Returns ``self``."""
        check_choice("inner", self.inner, tuple(INNER_OBJECTIVES.names()))
        check_choice("diw", self.diw, tuple(DIW_MODES.names()))
        check_choice("balance", self.balance, tuple(BALANCES.names()))
        check_choice("robust_target", self.robust_target, ROBUST_TARGETS)
        check_choice("clean_input", self.clean_input, CLEAN_INPUTS)
        check_choice("norm", self.norm, NORMS)
        check_number("diw_temperature", self.diw_temperature, low=0, low_open=True)
        check_number("beta", self.beta)
        check_number("rho", self.rho, low=0, low_open=True)
        if self.rho != 1 and not BALANCES.get(self.balance).uses_prior:
            raise ConfigError(f"rho: the '{self.balance}' balance has no prior; expected 1, got {self.rho!r}")
        check_number("ema_momentum", self.ema_momentum, low=0, high=1, high_open=True)
        check_number("eta", self.eta, low=0, high=1, low_open=True)
        check_number("lambda_robust", self.lambda_robust, low=0)
        check_number("lambda_clean", self.lambda_clean, low=0)
        self._check_lambdas()
        if self.inner_teacher is not None and (not isinstance(self.inner_teacher, str) or not self.inner_teacher):
            raise ConfigError(f"inner_teacher: expected a teacher's name or null, got {self.inner_teacher!r}")
        check_number("temperature", self.temperature, low=0, low_open=True)
        if self.logit_scale != "model":
            check_number("logit_scale", self.logit_scale, low=0, low_open=True)
        parse_eps(self.eps, "eps", self.norm)
        if self.alpha is not None and parse_eps(self.alpha, "alpha", self.norm) == 0:
            raise ConfigError(f"alpha: expected a step size > 0, got {self.alpha!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps: expected a whole number >= 0, got {self.steps!r}")
        if not isinstance(self.cache_clean_teacher, bool):
            raise ConfigError(f"cache_clean_teacher: expected true or false, got {self.cache_clean_teacher!r}")
        self._check_cache_dir()
        check_number("reference_robust_scale", self.reference_robust_scale)
        check_number("reference_clean_scale", self.reference_clean_scale)
        return self

    def _check_lambdas(self) -> None:
        if self.lambdas is None:
            return
        if not isinstance(self.lambdas, Mapping):
            raise ConfigError(f"lambdas: expected a mapping teacher name -> weight, got {self.lambdas!r}")
        if self.lambdas and self.balance != "fixed":
            raise ConfigError(
                f"lambdas: only the fixed balance takes weights per teacher; expected balance: fixed, got "
                f"{self.balance!r}"
            )
        for name, weight in self.lambdas.items():
            if name in STANDARD_LAMBDA_FIELDS:
                raise ConfigError(
                    f"lambdas.{name}: the standard {name} teacher takes {STANDARD_LAMBDA_FIELDS[name]}; expected "
                    "lambdas for the other teacher names"
                )
            check_number(f"lambdas.{name}", weight, low=0)

    def _check_cache_dir(self) -> None:
        if self.cache_dir is None:
            return
        if not isinstance(self.cache_dir, (str, PathLike)) or not str(self.cache_dir):
            raise ConfigError(f"cache_dir: expected a folder path or null, got {self.cache_dir!r}")
        if not self.cache_clean_teacher:
            raise ConfigError(
                "cache_dir: a folder for the clean-image teacher logits needs cache_clean_teacher: true "
                f"(got cache_clean_teacher: {self.cache_clean_teacher!r}); set it or remove cache_dir"
            )
