"""Training methods: MMT-ARD and its baselines, their losses (KL, DIW, balance) and one registry.

Importing this package registers every method: ``mmt-ard``, ``reference``, ``ard``, ``tecoa``, ``fare``,
``pmg-aft``, ``clean-ft``.
"""

from mmtard.methods import clean_ft, fare, mmt_ard, pmg_aft, tecoa  # noqa: F401  (fill the registry)
from mmtard.methods.base import TEACHER_ROLES, Method, MethodOutput, freeze, unwrap
from mmtard.methods.config import INNER_OBJECTIVES, PRESETS, MethodConfig, method_config
from mmtard.methods.losses import BALANCE_MODES, DIW_MODES, create_balance, importance_weights, per_sample_kl
from mmtard.methods.registry import create_method, list_methods, register_method

__all__ = [
    "BALANCE_MODES",
    "DIW_MODES",
    "INNER_OBJECTIVES",
    "PRESETS",
    "TEACHER_ROLES",
    "Method",
    "MethodConfig",
    "MethodOutput",
    "create_balance",
    "create_method",
    "freeze",
    "importance_weights",
    "list_methods",
    "method_config",
    "per_sample_kl",
    "register_method",
    "unwrap",
]
