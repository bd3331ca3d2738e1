"""Experiments built on the library: the CPU-scale protocol (``protocol``) and its report (``report``).

This layer sits above ``train`` and ``eval``; the library never imports it. ``mmtard demo`` and
``benchmarks/zoo_benchmark.py`` call it; ``cells`` holds that benchmark's cells, recipes and jobs, ``stats`` its
paired bootstrap intervals.
"""

from mmtard.experiments.protocol import (
    DEMO_SCALE,
    ZOO_SCALE,
    ProtocolScale,
    StageSpec,
    given_models,
    protocol_stages,
    run_protocol,
)
from mmtard.experiments.report import write_protocol_report

__all__ = [
    "DEMO_SCALE",
    "ZOO_SCALE",
    "ProtocolScale",
    "StageSpec",
    "given_models",
    "protocol_stages",
    "run_protocol",
    "write_protocol_report",
]
