#!/usr/bin/env bash
# What BENCHMARKS.md section 2 ran on this project's 2-core machine (issue 16, calibrated recipe lr2e-3): about
# 4 h 40 min on 2 cores, two students at a time with one thread each (on 2026-12-03 it ran in two sessions, the
# times are in README "Benchmarks"). Each invocation reuses what the earlier ones finished, so stop and rerun at
# will; on the finished run folder the whole script only rewrites the tables and plots. Needs the rebuilt zoo:
#
#   .venv/bin/python ../shared/zoo/rebuild.py --out runs/zoo
#   bash benchmarks/zoo_cpu.sh            # PYTHON=... to use another interpreter
#
# 1. The students, PGD-10 only: the baselines and mmt-ard's three candidates on 3 seeds, the ablation on seed 0,
#    and the zoo's four models (its foundations and teachers, never trained; PGD-10 only).
# 2. aa at 4/255 on every student (7 to 12.5 minutes of one core each): ard and the candidates first.
# 3. The calibration table (runs/bench-zoo/calibration.md), the tables (runs/bench-zoo/benchmark.md),
#    docs/benchmarks/issue16/zoo-headline.json and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bench() { "$PYTHON" benchmarks/zoo_benchmark.py --zoo runs/zoo --out runs/bench-zoo --distill-images train "$@"; }
CANDIDATES=(mmt-ard_diwref mmt-ard_fixed91 mmt-ard_fixed)
BASELINES=(tecoa mmt-ard-adv reference)
ABLATION=(mmt-ard mmt-ard_rho9 mmt-ard_gap)

bench --no-aa --no-zoo-models --jobs 2 --seeds 0 1 2 --cells ard "${CANDIDATES[@]}" "${BASELINES[@]}" \
    --ablation "${ABLATION[@]}"
bench --no-aa --jobs 2 --seeds 0 --cells ard --ablation  # the zoo's foundations and teachers
bench --no-zoo-models --jobs 2 --seeds 0 1 2 --cells ard "${CANDIDATES[@]}" --ablation
bench --no-zoo-models --jobs 2 --seeds 0 1 2 --cells "${BASELINES[@]}" --ablation "${ABLATION[@]}"
bench --calibrate lr2e-3 --seeds 0 1 2 --report-only  # runs/bench-zoo/calibration.md
bench --seeds 0 1 2 --cells ard "${CANDIDATES[@]}" "${BASELINES[@]}" --ablation "${ABLATION[@]}" \
    --report-only --docs docs/benchmarks/issue16
