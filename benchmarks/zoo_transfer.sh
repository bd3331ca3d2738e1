#!/usr/bin/env bash
# BENCHMARKS.md section 2 (issue 25): the students distil on a transfer set (half of the seen classes' test images,
# which no zoo model trained on) and are evaluated on the other half; the protocol check, the controls and the
# pre-registered grid, in the order of its priority. Each invocation reuses what the earlier ones finished, so stop
# and rerun at will; on a finished run folder the whole script only rewrites the tables, records and plots. Needs the
# rebuilt zoo:
#
#   .venv/bin/python ../shared/zoo/rebuild.py --out runs/zoo
#   bash benchmarks/zoo_transfer.sh            # PYTHON=... to use another interpreter; STAGES=... to stop early
#
# 1. Seed 0 of ard, ard_rslad (the authors' single-teacher script), mmt-ard_diwref and its self-anchor control.
# 2. The zoo's models that precondition P2 compares (PGD-10), and the interpolation frontier of the finished
#    baselines (ard, ard_rslad, tecoa; alpha 0.25, 0.5, 0.75 with the student foundation, PGD-10 4/255).
# 3. Seeds 1 and 2 of the four cells of step 1, then their frontiers.
# 4. The seed-0 ablation: mmt-ard's defaults, fixed 0.9/0.1 and 1/1, the foundation-teacher or the robust teacher's
#    weights as (another) clean teacher, tecoa; then tecoa's frontier.
# 5. aa at 4/255 on seed 0 of the four cells of step 1, then on seeds 1 and 2 of ard and mmt-ard_diwref (the goal's
#    baseline and candidate).
# 6. LoRA students (hypothesis 5): ard_lora and mmt-ard_diwref_lora on seed 0, then ard_lora's frontier.
# 7. The regime (issue 25's step 5): lr2e-4-800 (a tenth of the learning rate, 4x the images seen) in
#    runs/bench-xfer-regime: seed 0 of ard and mmt-ard_diwref, then ard, ard_rslad and mmt-ard_diwref on seeds 0 to
#    2; each run followed by one that adds ard's frontier.
# 8. The tables, docs/benchmarks/zoo-headline.json, protocol-check.json, per-image.json.gz and the plots; the
#    regime's in docs/benchmarks/regime/. It runs last, after 9.
# 9. LoRA at a learning rate of its own (hypothesis 5 at equal robustness): ard_lora at 5x and 10x the calibrated
#    learning rate on seed 0; BENCHMARKS.md's fourth pre-registration gives the rule that picks one of them (10x);
#    then ard_lora_lr10x and mmt-ard_diwref_lora_lr10x on seeds 0 to 2, and ard_lora_lr10x's frontier; then the
#    self-anchor under the same recipe (the fifth pre-registration's control).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STAGES=${STAGES:-1 2 3 4 5 6 7 9 8}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
bench() { "$PYTHON" benchmarks/zoo_benchmark.py --zoo runs/zoo --out runs/bench-xfer --distill-images transfer "$@"; }
KEY=(ard ard_rslad mmt-ard_diwref mmt-ard_diwref_selfanchor)
ABLATION=(mmt-ard mmt-ard_fixed91 mmt-ard_diwref_rclean mmt-ard_diwref_ftclean mmt-ard_fixed tecoa)
LORA=(ard_lora mmt-ard_diwref_lora)
# stage 9: LoRA at 10x the learning rate, 3 seeds, and the self-anchor control under it
LORA10X=(ard_lora_lr10x mmt-ard_diwref_lora_lr10x mmt-ard_diwref_selfanchor_lora_lr10x)
ZOO=(teacher-clean teacher-robust foundation-student)
# The regime's own folder; the student foundation's row (the same images) is reused from runs/bench-xfer.
REGIME=(--out runs/bench-xfer-regime --recipe lr2e-4-800 --eval-every 80 --zoo-models foundation-student
        --ablation)
for stage in $STAGES; do
  case $stage in
    1) bench --no-aa --no-zoo-models --jobs 2 --seeds 0 --cells "${KEY[@]}" --ablation ;;
    2) bench --no-aa --jobs 2 --seeds 0 --cells "${KEY[@]}" --ablation --zoo-models "${ZOO[@]}" ;;
    3) bench --no-aa --no-zoo-models --jobs 2 --seeds 0 1 2 --cells "${KEY[@]}" --ablation
       bench --no-aa --no-zoo-models --jobs 2 --seeds 0 1 2 --cells "${KEY[@]}" --ablation ;;  # their frontiers
    4) bench --no-aa --no-zoo-models --jobs 2 --seeds 0 --cells ard --ablation "${ABLATION[@]}"
       bench --no-aa --no-zoo-models --jobs 2 --seeds 0 --cells ard --ablation "${ABLATION[@]}" ;;  # tecoa's frontier
    5) bench --no-zoo-models --jobs 2 --seeds 0 --cells "${KEY[@]}" --ablation
       bench --no-zoo-models --jobs 2 --seeds 0 1 2 --cells ard mmt-ard_diwref --ablation ;;  # the goal's two
    6) for _ in 1 2; do  # the second run adds ard_lora's frontier
         bench --no-aa --no-zoo-models --jobs 2 --seeds 0 --cells ard --ablation "${LORA[@]}" --frontier ard_lora \
           --against ard_lora
       done ;;
    7) mkdir -p runs/bench-xfer-regime/rows
       cp -n runs/bench-xfer/rows/foundation-student.json runs/bench-xfer-regime/rows/
       for _ in 1 2; do bench "${REGIME[@]}" --no-aa --jobs 2 --seeds 0 --cells ard mmt-ard_diwref --frontier ard; done
       for _ in 1 2; do  # ard_rslad's frontier too: under this recipe either can be the stronger baseline
         bench "${REGIME[@]}" --no-aa --jobs 2 --seeds 0 1 2 --cells ard ard_rslad mmt-ard_diwref --frontier ard ard_rslad
       done ;;
    8) bench --seeds 0 1 2 --cells "${KEY[@]}" "${LORA10X[@]}" --ablation "${ABLATION[@]}" "${LORA[@]}" ard_lora_lr5x \
         --zoo-models "${ZOO[@]}" --frontier ard ard_rslad tecoa ard_lora ard_lora_lr10x --against ard_lora ard_lora_lr10x \
         --report-only --docs docs/benchmarks
       bench "${REGIME[@]}" --seeds 0 1 2 --cells ard ard_rslad mmt-ard_diwref --frontier ard ard_rslad --against ard \
         --report-only --docs docs/benchmarks/regime ;;
    9) bench --no-aa --no-zoo-models --jobs 2 --seeds 0 --cells ard --ablation ard_lora_lr5x ard_lora_lr10x
       # the rule chose 10x (seen PGD-10 30.2 against 29.0 at 5x, ard's 41.2); 3 seeds, then its frontier
       for _ in 1 2; do
         bench --no-aa --no-zoo-models --jobs 2 --seeds 0 1 2 --cells ard ard_lora_lr10x mmt-ard_diwref_lora_lr10x \
           --ablation --frontier ard_lora_lr10x --against ard_lora_lr10x
       done
       # the control of the fifth pre-registration: the self-anchor under the same LoRA recipe
       bench --no-aa --no-zoo-models --jobs 2 --seeds 0 1 2 --cells ard "${LORA10X[@]}" --ablation \
         --frontier ard_lora_lr10x --against ard_lora_lr10x ;;
  esac
done
