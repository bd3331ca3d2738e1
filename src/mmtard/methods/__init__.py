"""Training methods: MMT-ARD and its baselines, their building blocks and one registry per extension kind.

- ``registry``: methods and their presets (``@register_method(name, **preset)``);
- ``teachers``: the teacher rules (names, kinds, order, defaults, per-name weights, metric suffixes);
- ``weighting``: DIW modes (``DIW_MODES``); ``balance``: balance rules (``BALANCES``); ``inner``: inner
  objectives (``INNER_OBJECTIVES``); ``losses``: pure tensor functions.

Importing this package registers every method: ``mmt-ard``, ``reference``, ``ard``, ``tecoa``, ``fare``,
``pmg-aft``, ``clean-ft``. ``create_method(cfg, teachers)`` gives the distilling methods any number of
named ``clean``/``robust`` teachers; ``plan_teachers(method_class(name), cfg, configured)`` says which, without
building a method.
"""

from mmtard.methods import clean_ft, fare, mmt_ard, pmg_aft, tecoa  # noqa: F401  (fill the registry)
from mmtard.methods.balance import BALANCES, Balance, create_balance
from mmtard.methods.base import Method, MethodOutput, freeze, unwrap
from mmtard.methods.config import MethodConfig
from mmtard.methods.inner import INNER_OBJECTIVES
from mmtard.methods.losses import per_sample_kl
from mmtard.methods.registry import (
    METHODS,
    create_method,
    list_methods,
    method_class,
    method_config,
    presets,
    register_method,
)
from mmtard.methods.teachers import ORIGINAL, TEACHER_KINDS, TEACHER_ROLES, TeacherPlan, metric_suffix, plan_teachers
from mmtard.methods.weighting import DIW_MODES, importance_weights

__all__ = [
    "BALANCES",
    "DIW_MODES",
    "INNER_OBJECTIVES",
    "METHODS",
    "ORIGINAL",
    "TEACHER_KINDS",
    "TEACHER_ROLES",
    "Balance",
    "Method",
    "MethodConfig",
    "MethodOutput",
    "TeacherPlan",
    "create_balance",
    "create_method",
    "freeze",
    "importance_weights",
    "list_methods",
    "method_class",
    "method_config",
    "metric_suffix",
    "per_sample_kl",
    "plan_teachers",
    "presets",
    "register_method",
    "unwrap",
]
