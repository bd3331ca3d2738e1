#!/usr/bin/env bash
# The one prepared GPU check of issue 9: about 7 minutes on one H100 or H200, each stage under its own
# time limit (a stage that runs out keeps the cells it finished: results are rewritten after each cell).
#
#   1. step_time: ard, mmt-ard, tecoa at batch 128/256/512 (ViT-B-32 student, ViT-L-14 teachers, random
#      weights, bf16, PGD-10): s/step split into attack / teachers / student update (CUDA events),
#      FLOPs, MFU against the bf16 matrix-product rate measured in the same run, peak memory, OOM as such;
#   2. aa: aa / APGD-CE images/s of ViT-B-32 and ViT-L-14 at 224 px in bf16 and fp32;
#   3. levers: mmt-ard and ard at batch 256 with none / a warm clean-image teacher cache / channels-last /
#      torch.compile of the towers.
#
# Writes into $OUT (runs/gpu_check when unset): env.txt, log.txt and step_time, aa, levers (.json + .md).
#
# The GPU machine has PyTorch but not open_clip, ftfy, wcwidth, clip-benchmark or pyautoattack, and
# cannot download. Prepare them once in .carry/ (git-ignored; about 19 MB), on a machine with pip:
#
#   echo /.carry/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d /tmp/mmtard-wheels \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 clip-benchmark==1.6.2 pyautoattack==0.2.0
#   for w in /tmp/mmtard-wheels/*.whl; do unzip -qo "$w" -d .carry; done
#   rm -rf .carry/pyautoattack/examples   # a 43 MB example model; a device call carries 64 MiB at most
#
# then run it there with .carry carried (the device tool: carry [".carry"], timeout_s 540):
#
#   bash benchmarks/gpu_check.sh
#
# Everything else it needs (numpy, pillow, pyyaml, peft, safetensors, timm, regex, huggingface_hub,
# scikit-learn, matplotlib, tensorboard) is in that machine's image. mmtard itself comes from src/.
#
# CPU smoke test at toy scale (tiny models, a few steps; about 2 minutes on 2 cores):
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --tiny      # or MMTARD_GPU_CHECK_TINY=1
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONPATH="${CARRY:-$REPO/.carry}:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # CARRY: where the packages are
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

TINY=${MMTARD_GPU_CHECK_TINY:-0}
[[ "${1:-}" == "--tiny" ]] && TINY=1
if [[ "$TINY" == 1 ]]; then
    MODELS=(--device cpu --student tiny-vit-s --teacher tiny-vit-l --num-classes 10)
    GRID=(--batch-sizes 4 8 --steps 1 --warmup 1)
    AA=(--device cpu --num-classes 10 --steps 2
        --cells tiny-vit-s:fp32:4:apgd-ce tiny-vit-s:bf16:4:aa tiny-vit-l:fp32:4:apgd-ce)
    LEVERS=(--batch-sizes 4 --steps 1 --warmup 1 --levers ${MMTARD_GPU_CHECK_LEVERS:-none teacher-cache channels-last})
    LIMITS=(300 300 300)
else
    MODELS=(--device cuda --student ViT-B-32 --teacher ViT-L-14)
    GRID=(--batch-sizes 128 256 512 --steps 5 --warmup 2)
    AA=(--device cuda)
    LEVERS=(--batch-sizes 256 --steps 5 --warmup 2 --levers ${MMTARD_GPU_CHECK_LEVERS:-none teacher-cache channels-last compile})
    LIMITS=(220 90 140)
    if [[ "${MMTARD_GPU_CHECK_SHORT:-0}" == 1 ]]; then  # inside benchmarks/gpu_run.sh: about 4 minutes
        GRID=(--batch-sizes 128 256 512 --steps 3 --warmup 1)
        LEVERS=(--batch-sizes 256 --steps 3 --warmup 1 --levers ${MMTARD_GPU_CHECK_LEVERS:-none teacher-cache compile})
        LIMITS=(120 45 70)
    fi
fi

# stage NAME LIMIT_SECONDS COMMAND...: run it under a time limit, output to the terminal and the log.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$LOG"
}

{
    date -u
    git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -c "import sys, torch, open_clip, pyautoattack, mmtard
print('python', sys.version.split()[0], 'torch', torch.__version__, 'open_clip', open_clip.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
print('mmtard from', mmtard.__file__, '; open_clip from', open_clip.__file__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage step_time "${LIMITS[0]}" "$PY" benchmarks/gpu_step_time.py "${MODELS[@]}" "${GRID[@]}" \
    --methods ard mmt-ard tecoa --out "$OUT" --name step_time
stage aa "${LIMITS[1]}" "$PY" benchmarks/aa_throughput.py "${AA[@]}" --out "$OUT" --name aa
stage levers "${LIMITS[2]}" "$PY" benchmarks/gpu_step_time.py "${MODELS[@]}" "${LEVERS[@]}" \
    --methods mmt-ard ard --keep-going --out "$OUT" --name levers

for name in step_time aa levers; do
    [[ -f "$OUT/$name.md" ]] && { echo "## $name"; cat "$OUT/$name.md"; echo; }
done
