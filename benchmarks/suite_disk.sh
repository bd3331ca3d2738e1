#!/usr/bin/env bash
# How much temp space the test suite takes, and what it leaves behind (README "Install, run, test").
#
#   bash benchmarks/suite_disk.sh        # about 7 minutes on 2 cores; PYTHON=... to use another interpreter
#   bash benchmarks/suite_disk.sh tests/test_compile.py   # arguments go to pytest
#
# Runs the whole suite with TMPDIR set to a fresh folder (pytest's folders and torchrun's go there), samples
# that folder's size every 2 seconds, and prints the peak, what is left when pytest ends, by top-level folder
# (torch.compile's cache torchinductor_$USER stays, as it does in /tmp), and the size of .venv. The folder is
# removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
temp=$(mktemp -d)
trap 'rm -rf "$temp"' EXIT
size_mb() { du -sm "$1" 2>/dev/null | cut -f1; }

TMPDIR=$temp HF_HUB_OFFLINE=1 "$PYTHON" -m pytest -q -p no:cacheprovider "$@" &
pytest_pid=$!
peak=0
while kill -0 "$pytest_pid" 2>/dev/null; do
    now=$(size_mb "$temp")
    ((now > peak)) && peak=$now
    sleep 2
done
status=0
wait "$pytest_pid" || status=$?
echo "temp folder: peak ${peak} MB (sampled every 2 s), left after pytest: $(size_mb "$temp") MB"
echo "files left behind: $(find "$temp" -type f | wc -l)"
du -sm "$temp"/* 2>/dev/null | awk -v t="$temp/" '{sub(t, "", $2); print "  " $2 ": " $1 " MB"}' || true
echo ".venv: $(size_mb .venv) MB"
exit "$status"
