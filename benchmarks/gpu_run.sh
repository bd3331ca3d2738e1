#!/usr/bin/env bash
# The one prepared run on a lent GPU machine (about 9 minutes): the zoo benchmark's calibration grid and then
# every cell on every seed with the calibrated recipe (issue 16), then the GPU check of issue 9
# (benchmarks/gpu_check.sh, shortened).
#
# The machine has PyTorch and nothing else, and no internet. Prepare the bundle here once (about 61 MiB,
# git-ignored; it holds the committed tree to run), then run that tree there with .gpu carried (the device tool:
# carry [".gpu"], timeout_s 595):
#
#   python benchmarks/gpu_bundle.py pack --out .gpu
#   mkdir -p /tmp/snap && tar xzf .gpu/repo.tar.gz -C /tmp/snap && BUNDLE=$PWD/.gpu bash /tmp/snap/benchmarks/gpu_run.sh
#
# Writes $OUT (runs/gpu_run when unset): results.tar.gz (everything below, rewritten after each stage, so a
# stage that runs out of time keeps what finished), benchmark.md, and log.txt; the work folder is $WORK
# (runs/gpu_work). The students' weights stay on the
# machine; the tables are rebuilt here from the results alone:
#
#   mkdir -p runs/bench-gpu && tar xzf results.tar.gz -C runs/bench-gpu --strip-components=2 runs/bench-gpu
#   python benchmarks/zoo_benchmark.py --zoo runs/zoo --out runs/bench-gpu --cells all --report-only
#
# CPU smoke test at toy scale (a few steps, tiny evaluations; about 5 minutes on 2 cores):
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh --tiny
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/runs/gpu_run}
WORK=${WORK:-$REPO/runs/gpu_work}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
: >"$LOG"
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-$REPO/.gpu}
export PYTHONPATH="$BUNDLE/site:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [[ "${1:-}" == "--tiny" ]]; then
    CALIBRATE=(--calibrate smoke --seeds 0 --eval-samples 10 --eval-every 1 --jobs 2)
    BENCH=(--recipe smoke --seeds 0 1 --eval-samples 10 --eval-every 1 --jobs 2 --cells ard mmt-ard --ablation mmt-ard_gap)
    LIMITS=(900 300)
    CHECK=(--tiny)
else
    CALIBRATE=(--calibrate lr1e-3 lr2e-3 lr1e-3-400 lr2e-3-400 lr4e-3 --jobs 16)
    BENCH=(--jobs 16 --cells all)
    LIMITS=(300 245)
    CHECK=()
fi

# stage NAME LIMIT_SECONDS COMMAND...: run it under a time limit, output to the terminal and the log.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$LOG"
}

# save: everything small so far, the students' weights and checkpoints left out.
save() {
    local parts=()
    for part in bench-gpu docs gpu_check; do [[ -e "$WORK/$part" ]] && parts+=("$part"); done
    tar czf "$OUT/results.tar.gz.part" --exclude model.safetensors --exclude checkpoints --exclude tensorboard \
        --exclude eval_journal -C "$WORK" "${parts[@]}" && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
    for report in benchmark.md calibration.md; do
        [[ -f "$WORK/bench-gpu/$report" ]] && cp "$WORK/bench-gpu/$report" "$OUT/$report"
    done
    return 0
}

{
    date -u
    echo "commit $(cat "$BUNDLE/COMMIT" 2>/dev/null || git -C "$REPO" rev-parse HEAD)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import sys, torch, open_clip; print('python', sys.version.split()[0], 'torch', torch.__version__,
'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

stage unpack 120 "$PY" benchmarks/gpu_bundle.py unpack --bundle "$BUNDLE" --data "$WORK/cifar10"
stage zoo 120 "$PY" "$BUNDLE/zoo/rebuild.py" --out "$WORK/zoo"
stage calibrate "${LIMITS[0]}" "$PY" benchmarks/zoo_benchmark.py --zoo "$WORK/zoo" --data-dir "$WORK/cifar10" \
    --out "$WORK/bench-gpu" "${CALIBRATE[@]}"
save
stage bench "${LIMITS[0]}" "$PY" benchmarks/zoo_benchmark.py --zoo "$WORK/zoo" --data-dir "$WORK/cifar10" \
    --out "$WORK/bench-gpu" --docs "$WORK/docs" "${BENCH[@]}"
save
OUT_CHECK=$WORK/gpu_check
stage gpu_check "${LIMITS[1]}" env OUT="$OUT_CHECK" CARRY="$BUNDLE/site" MMTARD_GPU_CHECK_SHORT=1 \
    PYTHON="$PY" bash benchmarks/gpu_check.sh "${CHECK[@]}"
save
echo "done" | tee -a "$LOG"
