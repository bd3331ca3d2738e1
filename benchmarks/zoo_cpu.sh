#!/usr/bin/env bash
# What BENCHMARKS.md section 2 ran on this project's 2-core machine (issue 16, calibrated recipe lr2e-3), in the
# order it ran: about 3 hours on 2 cores (two students at a time, one thread each; on 2026-12-03 all but the last
# five aa evaluations took 2 h 35 min, the test suite running beside it three times). Each invocation
# reuses what the earlier ones finished, so stop and rerun at will. Needs the rebuilt zoo:
#
#   .venv/bin/python ../shared/zoo/rebuild.py --out runs/zoo
#   bash benchmarks/zoo_cpu.sh            # PYTHON=... to use another interpreter
#
# 1. The students, PGD-10 only: ard and mmt-ard's two candidates on 3 seeds, the ablation on seed 0, then tecoa
#    on 3 seeds, mmt-ard-adv and reference on 3 seeds, and the zoo's student foundation.
# 2. aa at 4/255 on seed 0 (10 to 12.5 minutes of one core per student): ard and the candidates first.
# 3. The calibration table (runs/bench-zoo/calibration.md), the tables (runs/bench-zoo/benchmark.md),
#    docs/benchmarks/zoo-headline.json and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bench() { "$PYTHON" benchmarks/zoo_benchmark.py --zoo runs/zoo --out runs/bench-zoo "$@"; }
CELLS=(ard mmt-ard_fixed mmt-ard_fixed91 tecoa mmt-ard-adv reference)
ABLATION=(mmt-ard mmt-ard_diwref mmt-ard_rho9 mmt-ard_gap)

bench --no-aa --no-zoo-models --jobs 2 --seeds 0 1 2 --cells ard mmt-ard_fixed91 mmt-ard_fixed \
    --ablation mmt-ard_diwref tecoa mmt-ard mmt-ard_rho9 mmt-ard_gap
bench --no-aa --no-zoo-models --jobs 2 --seeds 1 2 --cells tecoa --ablation
bench --no-aa --no-zoo-models --jobs 2 --seeds 0 --cells mmt-ard-adv reference --ablation
bench --no-zoo-models --jobs 2 --seeds 0 --cells ard mmt-ard_diwref mmt-ard_fixed91 mmt-ard_fixed --ablation
bench --no-aa --jobs 2 --seeds 1 2 --cells mmt-ard-adv reference --ablation --zoo-models foundation-student
bench --no-zoo-models --jobs 2 --seeds 0 --cells mmt-ard-adv tecoa reference --ablation "${ABLATION[@]}"
bench --calibrate lr2e-3 --seeds 0 1 2 --report-only  # runs/bench-zoo/calibration.md
bench --seeds 0 1 2 --cells "${CELLS[@]}" --ablation "${ABLATION[@]}" --zoo-models foundation-student \
    --report-only --docs docs/benchmarks
